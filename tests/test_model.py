"""The model package: one entry point for every source of weights (`model.factory.load_model`),
and the family interface a new family must fill."""
import json
import os
import shutil

import pytest
import torch
from conftest import tiny_chinese_clip_dir

from model.factory import load_model, run_model
from model.family import RetrievalModel
from model.weights import CheckpointError, WeightsError


def _embeddings(loaded, n: int = 3):
    torch.manual_seed(0)
    size = loaded.preprocessing.image_size
    pixels = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8)
    ids, mask = torch.randint(5, 50, (n, 9)), torch.ones(n, 9, dtype=torch.long)
    with torch.no_grad():
        return loaded.model.encode_image(pixels), loaded.model.encode_text(ids, mask)


def test_a_run_directory_and_its_checkpoint_file_load_the_same_model(runs, tmp_path):
    by_dir = load_model(runs["dual"])
    by_file = load_model(os.path.join(runs["dual"], "best.pt"))
    assert by_dir.origin == by_file.origin and by_dir.origin["checkpoint"].endswith("best.pt")
    assert len(by_dir.origin["sha256"]) == 64 and by_dir.origin["epoch"] >= 1
    assert by_dir.arch == by_file.arch and by_dir.arch["family"] == "dual" and not by_dir.model.training
    for a, b in zip(_embeddings(by_dir), _embeddings(by_file)):
        assert torch.equal(a, b)
    tokenizer = by_file.save_tokenizer(str(tmp_path))  # the run's own, copied
    assert os.path.dirname(tokenizer.path) == str(tmp_path / "tokenizer")
    with open(tokenizer.path, "rb") as a, open(os.path.join(runs["dual"], "tokenizer", "tokenizer.json"), "rb") as b:
        assert a.read() == b.read()
    last = load_model(runs["dual"], checkpoint="last")
    assert last.origin["checkpoint"].endswith("last.pt")
    with pytest.raises(WeightsError, match="brings its own tokenizer"):
        load_model(runs["dual"], tokenizer="char-vocab")


def test_a_run_directory_without_its_checkpoint_is_named(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["dual"], run, ignore=shutil.ignore_patterns("*.pt"))
    with pytest.raises(CheckpointError, match=r"best\.pt: checkpoint not found"):
        load_model(str(run))


def test_a_transformers_directory_and_a_cn_clip_file_load_as_published_weights(small_sample, tmp_path):
    from test_cnclip import save_like_training, tiny_cn_clip

    hf = load_model(str(tiny_chinese_clip_dir(tmp_path / "hf", small_sample)))
    assert hf.arch["family"] == "chinese-clip" and hf.origin["pretrained"]["pretrained"] == str(tmp_path / "hf")
    assert hf.preprocessing.text_normalization == "cn-clip" and hf.preprocessing.image_size == hf.model.image_size
    assert not hf.model.exact_vocabulary
    assert hf.save_tokenizer(str(tmp_path / "a")).vocab_size == hf.model.text_vocab_rows
    path = save_like_training(tiny_cn_clip(), tmp_path / "epoch_latest.pt")
    cn = load_model(path)
    assert cn.origin["pretrained"]["format"] == "cn_clip checkpoint" and len(cn.origin["pretrained"]["sha256"]) == 64
    assert cn.model.exact_vocabulary and cn.preprocessing.image_size == 224


def test_a_family_must_implement_every_method_the_stages_call():
    class Partial(RetrievalModel):  # no `family`: not registered
        def encode_text(self, input_ids, attention_mask):
            return input_ids

    assert Partial.__abstractmethods__ == {
        "create", "from_arch", "tokenizer_source", "starts_from_weights", "encode_image", "text_tower",
        "tower_modules", "tower_shape", "lora_targets", "param_layout", "set_grad_checkpointing"}
    with pytest.raises(TypeError):
        Partial()


def test_the_towers_shapes_drive_exports_fusion(runs):
    """export's fusion plan is each family's `tower_shape`: a BERT text tower and a CLIP ViT are
    fused (their attention switched to eager, the pattern ONNX Runtime fuses); a timm CNN is not."""
    from export.optimize import prepare_fusion

    dual, clip = run_model(runs["dual"]).model, run_model(runs["chinese-clip"]).model
    plans = prepare_fusion(dual)
    assert plans["image"] is None and plans["text"]["model_type"] == "bert"  # a timm CNN: shipped as exported
    assert plans["text"]["hidden_size"] == dual.text.config.hidden_size
    assert dual.text.config._attn_implementation == "eager"
    plans = prepare_fusion(clip)
    assert plans["image"]["model_type"] == "clip" and plans["text"]["model_type"] == "bert"
    assert plans["image"]["layers"] == clip.clip.config.vision_config.num_hidden_layers
    assert prepare_fusion(run_model(runs["dual"]).model, fused=False) == {"text": None, "image": None}


def test_the_multipliers_former_names_are_read_as_its_name(runs, tiny_bundle, tmp_path, caplog):
    """`logit_scale` is the model's learned log; the multiplier it gives is `inverse_temperature`
    in the config, the architecture record and the manifest. What earlier versions wrote under
    the former names (a preset, a checkpoint, a bundle) is read as the new."""
    from model.weights import load_checkpoint
    from predict.manifest import read_manifest
    from train.checkpoint import save_checkpoint
    from train.config import ConfigError, load_config

    cfg = load_config(None, ["model.logit_scale_init=20", "model.logit_scale_max=50"])
    assert (cfg.model.inverse_temperature_init, cfg.model.inverse_temperature_max) == (20, 50)
    assert "model.logit_scale_init is now model.inverse_temperature_init" in caplog.text
    with pytest.raises(ConfigError, match="model.logit_scale_max and model.inverse_temperature_max are one setting"):
        load_config(None, ["model.logit_scale_max=50", "model.inverse_temperature_max=60"])
    old = tmp_path / "old-run"
    shutil.copytree(runs["dual"], old)
    ckpt = load_checkpoint(str(old / "best.pt"))
    ckpt["arch"]["logit_scale_max"] = ckpt["arch"].pop("inverse_temperature_max")
    ckpt["config"]["model"]["logit_scale_max"] = ckpt["config"]["model"].pop("inverse_temperature_max")
    save_checkpoint(str(old / "best.pt"), ckpt)
    assert run_model(str(old)).model.inverse_temperature_max == ckpt["arch"]["logit_scale_max"]
    bundle = tmp_path / "old-bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    multiplier = manifest.pop("inverse_temperature")
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "format": "muge-bundle/1",
                                                      "logit_scale": multiplier}))
    assert read_manifest(str(bundle)).inverse_temperature == multiplier
