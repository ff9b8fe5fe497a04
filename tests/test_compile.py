"""`train.compile`: a compiled run trains like an eager one, and resumes bit for bit.

Dropout is off: inductor draws its own dropout masks, so with dropout the two runs are equally
valid but not comparable step by step. The compiled run pads text to `max_text_length` (one
static shape) where the eager run pads to each batch's longest; masking makes that invisible.

The compiled runs use one intra-op thread. With several, inductor's CPU kernels reduce in thread
order (the embedding gradient, for one), so two compiled runs differ slightly (up to 3.4e-4 in a
weight after one epoch here, neither interrupted) and a resumed one differs as much (up to
4e-3 after two epochs); with one thread both are reproducible, and the resume is exact.
"""
import json

import pytest
import torch
from tiny import tiny_config

from model.weights import load_checkpoint
from train.config import load_config
from train.main import train_run

pytestmark = pytest.mark.slow  # compiling takes a minute with inductor's cache cold (CI)
COMPILE_RTOL = 1e-3  # per-epoch mean loss, compiled vs eager (the README states it)


def _cfg(compile: bool):
    return tiny_config("dual", "train.epochs=2", "eval.untrained=false", "data.limit_pairs=192",
                       "model.head_dropout=0.0", "model.text.config.hidden_dropout_prob=0.0",
                       "model.text.config.attention_probs_dropout_prob=0.0", f"train.compile={str(compile).lower()}")


def _history(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def compiled_run(small_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_run(_cfg(True), str(small_sample), str(out))
    finally:
        torch.set_num_threads(threads)
    return out


def test_compiled_losses_match_eager(small_sample, tmp_path, compiled_run):
    train_run(_cfg(False), str(small_sample), str(tmp_path / "eager"))
    eager, compiled = _history(tmp_path / "eager"), _history(compiled_run)
    assert [h["train_loss"] for h in compiled] == pytest.approx([h["train_loss"] for h in eager], rel=COMPILE_RTOL)
    assert eager[-1]["train_loss"] < eager[0]["train_loss"]  # it trains at all


def test_compiled_resume_is_exact(small_sample, tmp_path, monkeypatch, compiled_run, one_thread):
    import train.main

    def killed(history, path):  # Ctrl-C right after epoch 1's checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(train.main, "plot_curves", killed)
    with pytest.raises(KeyboardInterrupt):
        train_run(_cfg(True), str(small_sample), str(tmp_path / "b"))
    monkeypatch.undo()
    assert load_checkpoint(str(tmp_path / "b" / "last.pt"))["epoch"] == 1
    train_run(load_config(str(tmp_path / "b" / "config.yaml")), str(small_sample), str(tmp_path / "b"), resume=True)
    a = load_checkpoint(str(compiled_run / "last.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "b" / "last.pt"))["model"]
    assert a.keys() == b.keys()  # compiled in place: no `_orig_mod.` prefixes
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["mean_recall"] for h in _history(compiled_run)] == [h["mean_recall"] for h in _history(tmp_path / "b")]


def test_flip_masking_compiles_once(one_thread):
    """A masked Chinese-CLIP tower under torch.compile: the kept length is fixed, so steps after the
    first reuse its graph (a recompile per step would raise here)."""
    from model.factory import create_model
    from train.speed import compile_model

    cfg = tiny_config("chinese-clip", "data.image_size=32")
    torch.manual_seed(0)
    model, _ = create_model(cfg.model, vocab_size=64)
    model.train().set_mask_ratio(0.5)
    compile_model(model)
    g = torch.Generator().manual_seed(0)

    def step():
        pixels = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=g)
        ids = torch.randint(5, 64, (4, 8), generator=g)
        image, text, _ = model(pixels, ids, torch.ones_like(ids))
        (image @ text.t()).sum().backward()
        return image

    first = step()
    saved = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        for _ in range(3):
            again = step()
    finally:
        torch._dynamo.config.error_on_recompile = saved
    assert first.shape == again.shape and torch.isfinite(again).all()
