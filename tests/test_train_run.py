"""End-to-end training runs on the small sample: artifacts, determinism, resume equivalence."""
import json
import re

import pytest
import torch
from click.testing import CliRunner
from tiny import tiny_config

from model.weights import load_checkpoint
from train.config import load_config
from train.main import train_run


def _weights(path):
    return load_checkpoint(str(path))["model"]


ACCUM3 = ["train.accum_steps=3", "train.batch_size=16", "data.limit_pairs=160"]


@pytest.mark.stage
@pytest.mark.parametrize("accum", [pytest.param([], marks=pytest.mark.slow), ACCUM3], ids=["accum1", "accum3"])
def test_resume_after_interruption_matches_uninterrupted_run(small_sample, tmp_path, monkeypatch, accum):
    """accum3: 10 batches of 16 per epoch in groups of 3, 3, 3 and 1: the short last group is stepped
    at the epoch's end, so nothing leaks into the next epoch and resume stays bit-identical."""
    cfg = tiny_config("dual", "train.epochs=2", "eval.untrained=false", "train.grad_clip=1.0", *accum)
    train_run(cfg, str(small_sample), str(tmp_path / "a"))
    import train.main

    def killed(history, path):  # Ctrl-C right after epoch 1's checkpoint and metrics are written
        raise KeyboardInterrupt

    monkeypatch.setattr(train.main, "plot_curves", killed)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, str(small_sample), str(tmp_path / "b"))
    monkeypatch.undo()
    first = load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert first["epoch"] == 1 and first["step"] == (4 if accum else 9)
    resumed = load_config(str(tmp_path / "b" / "config.yaml"))
    train_run(resumed, str(small_sample), str(tmp_path / "b"), resume=True)
    a, b = _weights(tmp_path / "a" / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [h["mean_recall"] for h in ha] == [h["mean_recall"] for h in hb]


@pytest.mark.stage
def test_cli_run_writes_every_artifact(small_sample, tmp_path):
    from train.cli import train

    out = tmp_path / "run"
    cfg = tiny_config("dual")
    from train.config import save_config

    save_config(cfg, str(tmp_path / "tiny.yaml"))
    res = CliRunner().invoke(train, ["--config", str(tmp_path / "tiny.yaml"), "--data", str(small_sample),
                                     "--out", str(out), "--set", "train.epochs=1"])
    assert res.exit_code == 0, res.output
    for name in ("best.pt", "last.pt", "metrics.jsonl", "curves.png", "config.yaml", "tokenizer/tokenizer.json"):
        assert (out / name).exists(), name
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]  # untrained, then epoch 1
    assert {"r1", "r5", "r10", "mean_recall", "mrr"} <= history[1].keys()
    assert load_config(str(out / "config.yaml")).train.epochs == 1
    best = load_checkpoint(str(out / "best.pt"))
    assert set(best) == {"model", "arch", "config", "epoch", "metrics"}  # no optimizer state in best.pt
    res = CliRunner().invoke(train, ["--config", str(tmp_path / "tiny.yaml"), "--set", "train.epohcs=1"])
    assert res.exit_code != 0 and "unknown config key train.epohcs" in res.output


def test_the_log_says_when_the_loader_starves_the_model():
    """A batch's time split into data wait and compute, from recorded (wait, total) times: a loader
    that takes most of each batch is called out, one that keeps up is not. Recorded times, not
    sleeps: the rule must not depend on how fast the machine is."""
    from train.loop import STARVED, WaitClock

    def described(batches):
        clock = WaitClock()
        for data_s, total_s in batches:
            clock.add(data_s, total_s)
        return clock.describe()

    starved = described([(0.16, 0.20), (0.15, 0.21), (0.17, 0.19)])
    assert starved == ("data wait 0.160s/batch (80%), compute 0.040s/batch; the loader starves the model: raise "
                       "data.workers"), starved
    fed = described([(0.01, 0.20), (0.02, 0.22)])
    assert fed == "data wait 0.015s/batch (7%), compute 0.195s/batch", fed
    assert "starves" not in described([(STARVED * 0.2, 0.2)])
    assert "starves" in described([(STARVED * 0.2 + 1e-3, 0.2)])


def test_each_epoch_line_splits_the_time_into_data_wait_and_compute(small_sample, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="train.loop")
    train_run(tiny_config("dual", "train.epochs=1", "eval.untrained=false", "data.limit_pairs=64"),
              str(small_sample), str(tmp_path / "run"))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 1: loss"))
    assert re.search(r"; data wait [\d.]+s/batch \(\d+%\), compute [\d.]+s/batch", line), line


@pytest.mark.stage
def test_training_runs_past_undecodable_images_only_with_skip_bad_images(small_sample, tmp_path, caplog):
    """Images of the train gallery that do not decode stop a run, naming the TSV line; with
    `data.skip_bad_images` each is replaced by the next pair and logged, and the run completes."""
    import logging
    import shutil

    from conftest import not_an_image

    from competition import MugeDataError

    data = tmp_path / "data"
    shutil.copytree(small_sample, data)
    tsv = data / "MR_train_imgs.tsv"
    lines = tsv.read_bytes().splitlines(keepends=True)
    bad = {3, 10, 40}  # 0-based lines: images that train pairs use
    tsv.write_bytes(b"".join(not_an_image(x) if i in bad else x for i, x in enumerate(lines)))
    cfg = ("dual", "train.epochs=1", "eval.untrained=false")
    with pytest.raises(MugeDataError, match=r"MR_train_imgs.tsv:(4|11|41): image"):
        train_run(tiny_config(*cfg), str(data), str(tmp_path / "strict"))
    caplog.set_level(logging.WARNING, logger="train.data")
    train_run(tiny_config(*cfg, "data.skip_bad_images=true"), str(data), str(tmp_path / "skipping"))
    skipped = {r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")}
    assert skipped and all(re.search(r"MR_train_imgs.tsv:(4|11|41): image", m) for m in skipped), skipped
    history = [json.loads(x) for x in (tmp_path / "skipping" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1] and history[0]["train_loss"] < 10


@pytest.mark.stage
def test_the_sigmoid_loss_trains_with_lora_flip_and_the_gradient_cache_and_resumes(small_sample, tmp_path):
    """SigLIP's loss beside the rest: LoRA adapters, FLIP masking, chunks of the batch; its bias
    learns (it leaves SigLIP's -10), is kept in last.pt and restored by a resume."""
    from tiny import tiny_config

    from model.weights import load_checkpoint
    from train.main import train_run

    settings = ("train.loss=sigmoid", "train.lora.rank=4", "train.mask_ratio=0.5", "train.grad_cache_chunk=16",
                "data.limit_pairs=64", "eval.untrained=false")
    out = tmp_path / "run"
    train_run(tiny_config("chinese-clip", "train.epochs=1", *settings), str(small_sample), str(out))
    first = load_checkpoint(str(out / "last.pt"))
    assert first["loss"]["bias"] != -10.0 and first["config"]["train"]["loss"] == "sigmoid"
    assert any(".lora_" in k for k in first["model"])
    train_run(tiny_config("chinese-clip", "train.epochs=2", *settings), str(small_sample), str(out), resume=True)
    second = load_checkpoint(str(out / "last.pt"))
    assert second["epoch"] == 2 and second["loss"]["bias"] != first["loss"]["bias"]
