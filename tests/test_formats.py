"""`muge export --format hf | cnclip`: a Chinese-CLIP run's model out as a `transformers`
directory and as Chinese-CLIP's own checkpoint file, each loaded by its own library and equal to
the run's torch model."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import muge, refused

from model.factory import run_model
from model.weights import safe_load


def _inputs(model, size: int, n: int = 4):
    """uint8 pixels, and ids padded with [PAD] (0) as both libraries pad."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    ids = torch.randint(5, model.text_vocab_rows, (n, 12), generator=g)
    ids[0, 7:] = 0
    ids[:, 0] = 2  # [CLS]
    return pixels, ids, ids.ne(0).long()


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers >= 5 returns an output


def test_a_run_exported_as_a_transformers_directory_loads_there(runs, small_sample, tmp_path):
    from transformers import AutoTokenizer, ChineseCLIPModel, ChineseCLIPProcessor

    out = tmp_path / "hf"
    result = muge("export", runs["chinese-clip"], "--format", "hf", "--out", str(out), "--data", str(small_sample))
    assert result.exit_code == 0, result.output
    assert "model.safetensors" in os.listdir(out) and not any(n.startswith(".") for n in os.listdir(tmp_path))
    ours = run_model(runs["chinese-clip"])
    theirs = ChineseCLIPModel.from_pretrained(str(out)).eval()
    pixels, ids, mask = _inputs(ours.model, ours.preprocessing.image_size)
    with torch.no_grad():
        text = F.normalize(_features(theirs.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)
        image = F.normalize(_features(theirs.get_image_features(pixel_values=ours.model.pixels(pixels))), dim=-1)
        assert torch.allclose(text, ours.model.encode_text(ids, mask), atol=1e-5)
        assert torch.allclose(image, ours.model.encode_image(pixels), atol=1e-5)
    processor = ChineseCLIPProcessor.from_pretrained(str(out))
    run_tokenizer = ours.save_tokenizer(str(tmp_path / "run"))
    query = "红色 连衣裙 夏季"
    assert processor.tokenizer(query)["input_ids"] == run_tokenizer([query])[0][0].tolist()
    assert AutoTokenizer.from_pretrained(str(out))(query)["input_ids"] == processor.tokenizer(query)["input_ids"]
    assert processor.image_processor.size == {"height": 32, "width": 32}
    card = (out / "README.md").read_text(encoding="utf-8")
    history = [json.loads(line) for line in open(os.path.join(runs["chinese-clip"], "metrics.jsonl"))]
    for h in history:
        assert f"| {h['epoch']} | {h['r1']:.2f} | {h['r5']:.2f} | {h['r10']:.2f} | {h['mean_recall']:.2f} |" in card
    assert "ChineseCLIPModel.from_pretrained" in card and "epochs:" in card


@pytest.fixture(scope="module")
def cnclip_shaped_run(small_sample, tmp_path_factory):
    """A tiny Chinese-CLIP run of a shape cn_clip's `CLIP` builds (vision MLP 4x wide)."""
    from tiny import CNCLIP_SHAPED, tiny_config

    from bench.shapes import setting
    from train.main import train_run

    out = tmp_path_factory.mktemp("cnclip-shaped") / "run"
    train_run(tiny_config("chinese-clip", setting("model.config", CNCLIP_SHAPED), "train.epochs=1",
                          "data.limit_pairs=64"),
              str(small_sample), str(out))
    return str(out)


def test_a_run_exported_in_chinese_clips_format_is_its_own(cnclip_shaped_run, runs, tmp_path):
    from tiny import cn_clip_of

    path = tmp_path / "muge.pt"
    assert muge("export", cnclip_shaped_run, "--format", "cnclip", "--out", str(path)).exit_code == 0
    saved = safe_load(str(path))
    assert {"epoch", "step", "name", "state_dict"} <= saved.keys()
    assert all(k.startswith("module.") for k in saved["state_dict"])
    ours = run_model(cnclip_shaped_run)
    theirs = cn_clip_of(ours.model.clip.config)
    # as cn_clip's create_model loads a checkpoint: `module.` removed, strict
    theirs.load_state_dict({k[len("module."):]: v for k, v in saved["state_dict"].items()})
    pixels, ids, mask = _inputs(ours.model, ours.preprocessing.image_size)
    with torch.no_grad():
        assert torch.allclose(F.normalize(theirs.encode_text(ids), dim=-1), ours.model.encode_text(ids, mask),
                              atol=1e-5)
        assert torch.allclose(F.normalize(theirs.encode_image(ours.model.pixels(pixels)), dim=-1),
                              ours.model.encode_image(pixels), atol=1e-5)
    # a vision MLP 2x wide (the tiny runs'): cn_clip's CLIP cannot hold it, so nothing is written
    refused(muge("export", runs["chinese-clip"], "--format", "cnclip", "--out", str(tmp_path / "no.pt")),
            "cn_clip's code cannot build this model: vision_config.intermediate_size=64 (cn_clip's: 128)")
    assert not (tmp_path / "no.pt").exists()


@pytest.mark.parametrize("fmt", ["hf", "cnclip"])
def test_a_format_the_family_has_not_is_refused(runs, tmp_path, fmt):
    out = tmp_path / ("out.pt" if fmt == "cnclip" else "out")
    what = "transformers directory" if fmt == "hf" else "Chinese-CLIP checkpoint"
    refused(muge("export", runs["dual"], "--format", fmt, "--out", str(out)),
            f"a dual model cannot be written as --format {fmt}: its family has no", f"no {what} written")
    assert not out.exists() and os.listdir(tmp_path) == []
    refused(muge("export", "--pretrained", "x.pt", "--format", fmt, "--out", str(out)),
            f"--format {fmt} writes a run's")
