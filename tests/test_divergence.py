"""A run that diverges: an update with a non-finite loss or gradients is skipped on every optimizer
path (the CPU's, CUDA's fused kernel, fp16's GradScaler), a streak of them stops the run with a
clear error, and the checkpoints written before stay good and resumable (`train.guard`)."""
import json
import logging
import math

import pytest
import torch
from conftest import muge, refused
from tiny import tiny_config

from model.factory import create_model
from model.weights import load_checkpoint
from train.config import save_config
from train.guard import DivergenceGuard
from train.loss import ClipLoss
from train.main import train_run
from train.scheduler import create_scheduler
from train.step import StepParts, train_step


def _poisoned(monkeypatch, bad_calls):
    """ClipLoss whose loss is NaN on the calls (0-based) in `bad_calls`: a step that diverged."""
    real, calls = ClipLoss.forward, [0]

    def forward(self, *args):
        loss, value = real(self, *args)
        bad = calls[0] in bad_calls
        calls[0] += 1
        return (loss * float("nan"), value * float("nan")) if bad else (loss, value)

    monkeypatch.setattr(ClipLoss, "forward", forward)
    return calls


def _batch(n=4, size=32, vocab=50):
    g = torch.Generator().manual_seed(0)
    return {"pixels": torch.randint(0, 255, (n, size, size, 3), dtype=torch.uint8, generator=g),
            "input_ids": torch.randint(1, vocab, (n, 8), generator=g),
            "attention_mask": torch.ones(n, 8, dtype=torch.long),
            "image_ids": torch.arange(n), "query_ids": torch.arange(n)}


@pytest.mark.parametrize("path", ["cpu", "fused", "fp16-scaler"])
def test_a_non_finite_update_is_skipped_and_a_finite_one_applied(monkeypatch, path):
    """The weights and the optimizer's state are exactly as they were after a NaN step, on the
    branch each device takes (the fused kernel's `found_inf` is CUDA's; it runs on a CPU too)."""
    model, _ = create_model(tiny_config("dual").model, 50)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True if path == "fused" else None)
    scaler = torch.amp.GradScaler("cpu", enabled=path == "fp16-scaler", init_scale=1.0)
    guard = DivergenceGuard(3, torch.device("cpu"))
    parts = StepParts(ClipLoss(), optimizer, create_scheduler(optimizer, 0, 10), scaler, "fp32", torch.device("cpu"),
                      grad_clip=None if path == "cpu" else 1.0, guard=guard)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}  # (BatchNorm's statistics move in a forward)
    _poisoned(monkeypatch, {0})
    train_step(parts, model, _batch(), step=0)
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    assert all(int(s["step"]) == 0 for s in optimizer.state.values()) and guard.skipped_count() == 1
    train_step(parts, model, _batch(), step=1)
    assert not all(torch.equal(before[k], v) for k, v in model.named_parameters())
    assert guard.skipped_count() == 1 and int(guard.streak) == 0


def test_a_streak_of_skipped_updates_stops_only_at_its_limit():
    guard, optimizer = DivergenceGuard(3, torch.device("cpu")), torch.optim.SGD([torch.nn.Parameter(torch.ones(1))])
    for step, bad in enumerate([1, 1, 0, 1, 1], start=1):  # two, a good one, two: no streak of 3
        guard.record(torch.tensor(bool(bad)), step)
    guard.check(optimizer, 0, "")
    guard.record(torch.tensor(True), 6)
    with pytest.raises(RuntimeError, match="updates 4 to 6 all had a non-finite loss"):
        guard.check(optimizer, 0, "")


@pytest.mark.slow
def test_a_run_given_a_learning_rate_of_1e6_stops_in_its_first_epoch(small_sample, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    save_config(tiny_config("dual", "train.epochs=3", "train.warmup_steps=0"), str(cfg))
    refused(muge("train", "--config", cfg, "--data", small_sample, "--out", tmp_path / "run", "--set",
                 "train.lr={head: 1.0e6, text: 1.0e6, image: 1.0e6}", "--set", "train.log_every=2"),
            "training diverged in epoch 1: updates", "were skipped (train.max_skipped_steps=5)",
            "learning rates then: head", "Try lower learning rates (train.lr.head=1e+05")
    assert not (tmp_path / "run").exists()  # nothing was written before it stopped: nothing is left


@pytest.mark.stage
def test_a_run_that_diverges_after_a_good_epoch_keeps_its_checkpoints_and_resumes(small_sample, tmp_path,
                                                                                  monkeypatch, caplog):
    """Epoch 1 trains (one NaN batch in it is skipped, counted and left out of the loss); epoch 2
    goes NaN for good and the run stops; best.pt and last.pt are epoch 1's, finite, and the run
    resumes from last.pt to the end."""
    cfg = tiny_config("dual", "train.epochs=2", "eval.untrained=false", "data.limit_pairs=192", "train.log_every=2",
                      "train.max_skipped_steps=3")
    steps = 192 // cfg.train.batch_size
    calls = _poisoned(monkeypatch, {1} | set(range(steps, 10**6)))
    caplog.set_level(logging.INFO, logger="train.loop")
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="training diverged in epoch 2"):
        train_run(cfg, str(small_sample), str(out))
    assert "1 updates skipped (a non-finite loss or gradients)" in caplog.text
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1] and math.isfinite(history[0]["train_loss"])
    last, best = load_checkpoint(str(out / "last.pt")), load_checkpoint(str(out / "best.pt"))
    assert last["epoch"] == best["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    assert calls[0] >= steps + 3
    monkeypatch.undo()  # the cause is gone (a lower rate, say): the run goes on from last.pt
    train_run(cfg, str(small_sample), str(out), resume=True)
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and all(h["train_loss"] < 100 for h in history)


@pytest.mark.stage
def test_a_run_that_took_no_update_ends_with_the_divergence_message(small_sample, tmp_path, monkeypatch):
    """Fewer steps than train.max_skipped_steps, every one skipped: the run stops non-zero, and no
    best.pt of an epoch that took no update is written."""
    cfg = tmp_path / "tiny.yaml"
    save_config(tiny_config("dual", "train.epochs=2", "data.limit_pairs=64", "train.max_skipped_steps=5"), str(cfg))
    _poisoned(monkeypatch, set(range(10**6)))
    refused(muge("train", "--config", cfg, "--data", small_sample, "--out", tmp_path / "run"),
            "training diverged in epoch 1: every one of its 2 updates had a non-finite loss or gradients and was "
            "skipped, so it took none", "Try lower learning rates")
    assert not (tmp_path / "run").exists()
