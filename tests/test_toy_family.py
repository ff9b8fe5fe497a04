"""A new family is one file: `toy_family.py` defines one, and it goes through every stage the
two families go through, touching no other file: training with LoRA (adapters on its BERT, its
CNN trained whole), export behind the gate, `--format` refused, predict, and a soup."""
import json
import os

import pytest
import torch
from conftest import accepted, muge, refused
from tiny import COMMON, TINY_BERT

from bench.shapes import setting
from model.weights import load_checkpoint
from train.average import average_runs
from train.config import load_config
from train.main import train_run

FAST_EXPORT = ["--exporter", "torchscript", "--parity-queries", "20", "--parity-gallery", "30", "--parity-batch", "16"]


@pytest.fixture
def toy_family():
    """The third family, registered by importing its file, and unregistered after the test."""
    import toy_family  # noqa: F401 (defining the class registers `model.family: toy`)

    from model.family import FAMILIES

    FAMILIES.setdefault("toy", toy_family.ToyEncoder)
    yield
    FAMILIES.pop("toy")


@pytest.mark.stage
def test_a_third_family_in_one_file_goes_through_every_stage(toy_family, small_sample, tmp_path):
    def toy(*extra):
        return load_config(None, ["model.family=toy", "model.text.tokenizer=char-vocab",
                                  setting("model.text.config", TINY_BERT), "model.config={width: 16}",
                                  "model.embed_dim=32", *COMMON, "train.epochs=1", "data.limit_pairs=96",
                                  "train.lora.rank=4", "eval.untrained=false", *extra])

    a, b = tmp_path / "a", tmp_path / "b"
    train_run(toy(), str(small_sample), str(a))
    train_run(toy("train.data_seed=1"), str(small_sample), str(b))
    last, best = (load_checkpoint(str(a / name)) for name in ("last.pt", "best.pt"))
    adapters = [k for k in last["model"] if ".lora_" in k]
    assert adapters and all(k.startswith("text.") for k in adapters)  # on the BERT alone
    trained = {k for k, v in last["model"].items() if k.startswith("image.") and v.is_floating_point()}
    assert trained and not any(".lora_" in k for k in best["model"])
    bundle = tmp_path / "bundle"
    accepted(muge("export", a, "--out", bundle, "--data", small_sample, *FAST_EXPORT))
    assert json.loads((bundle / "manifest.json").read_text())["family"] == "toy"
    for fmt, out in (("hf", tmp_path / "hf"), ("cnclip", tmp_path / "x.pt")):
        refused(muge("export", a, "--format", fmt, "--out", out), f"a toy model cannot be written as --format {fmt}")
        assert not os.path.exists(out)
    accepted(muge("predict", "--bundle", bundle, "--data", small_sample, "--split", "valid", "--out",
                  tmp_path / "valid.jsonl", "--cache-dir", tmp_path / "cache", "--workers", "0"), "valid: R@1")
    soup = average_runs([str(a), str(b)], str(tmp_path / "soup"), data_dir=str(small_sample))
    assert 0 <= soup["metrics"]["mean_recall"] <= 100
    mean = {k: (v + load_checkpoint(str(b / "best.pt"))["model"][k]) / 2 for k, v in best["model"].items()}
    soup_weights = load_checkpoint(str(tmp_path / "soup" / "best.pt"))["model"]
    assert all(torch.allclose(soup_weights[k], mean[k], atol=1e-6) for k in mean if mean[k].is_floating_point())
