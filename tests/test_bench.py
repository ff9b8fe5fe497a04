"""`muge bench ...`: every bench runs at toy scale, prints its table and writes the same figures,
stamped, with --json / --csv. (Their speed is what they measure, never what a test asserts.)"""
import csv
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import accepted, muge, refused
from tiny import tiny_config

from bench.table import ROOT
from muge_cli import cli
from train.config import save_config


def _bench(*args) -> CliRunner:
    result = CliRunner().invoke(cli, ["bench", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def _stamped(path) -> dict:
    body = json.loads(path.read_text())
    assert body["date"] and body["machine"] and body["commit"]
    return body


def test_every_bench_module_is_a_command_and_every_command_loads():
    """A bench module with a click command is listed under `muge bench` (by its file's name), and
    every listed name loads that module's command: none is forgotten, none is broken."""
    import importlib

    import click

    from muge_cli import bench

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    defining = set()
    for file in sorted(os.listdir(os.path.join(root, "bench"))):
        if file.endswith(".py") and file != "__init__.py":
            module = importlib.import_module(f"bench.{file[:-3]}")
            commands = [v for v in vars(module).values() if isinstance(v, click.Command)]
            if any(c.callback.__module__ == module.__name__ for c in commands):
                defining.add(file[:-3])
    context = click.Context(bench)
    listed = set(bench.list_commands(context))
    assert listed == defining and {"tsv", "train", "scale"} <= listed
    for name in listed:
        command = bench.get_command(context, name)
        assert isinstance(command, click.Command) and command.callback.__module__ == f"bench.{name}", name


def test_tsv_bench_compares_the_index_with_a_dict(tmp_path):
    result = _bench("tsv", "--size-mb", 4, "--reads", 200, "--dir", tmp_path, "--json", tmp_path / "t.json",
                    "--csv", tmp_path / "t.csv")
    body = _stamped(tmp_path / "t.json")
    readers = [r["reader"] for r in body["rows"]]
    assert readers == ["offset index (ours)", "whole TSV in a dict"] and "memory: the dict holds" in result.output
    assert all(r["reads_per_s"] > 0 for r in body["rows"])
    with open(tmp_path / "t.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["reader"] for r in rows] == readers and rows[0]["commit"] == body["commit"]


def test_topk_bench_checks_the_baselines_agree(tmp_path):
    _bench("topk", "--queries", 300, "--gallery", 2000, "--dim", 32, "--loop-queries", 50, "--cnclip-queries", 5,
           "--json", tmp_path / "k.json")
    rows = _stamped(tmp_path / "k.json")["rows"]
    assert len(rows) == 3 and all(r["same_top10_sets"] == 1.0 for r in rows)


@pytest.mark.slow
def test_data_bench_stays_within_its_memory_limits_and_says_when_not(tmp_path):
    """Run as `muge` itself (a subprocess): the limits are the defaults the docs state, measured on
    the processes a user runs, not on workers forked from pytest."""
    args = [sys.executable, "-c", "from muge_cli import main; main()", "bench", "data", "--images", "600", "--pairs",
            "1000", "--batches", "4", "--batch-size", "16", "--workers", "1", "--dir", str(tmp_path),
            "--json", str(tmp_path / "d.json")]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    ok = subprocess.run(args, capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "1,000 pairs over 600 images" in ok.stdout and "memory limits: all within" in ok.stdout
    body = _stamped(tmp_path / "d.json")
    assert [r["process"] for r in body["rows"]] == ["main", "worker 0"]
    assert body["rows"][0]["rss_limit_mib"] == 1536 and body["rows"][1]["rss_limit_mib"] == 500
    over = subprocess.run(args + ["--worker-limit-mb", "1"], capture_output=True, text=True, env=env)
    assert over.returncode == 1 and "memory limits: EXCEEDED" in over.stdout


@pytest.mark.slow
def test_train_bench_reports_step_loop_and_pipeline(small_sample, tmp_path):
    """The bare step, the real loop (over two epochs of a short split), FLOPs, the pipeline per
    worker, and the JSON keys the docs name."""
    from bench.train import peak_tflops

    save_config(tiny_config("dual", "data.limit_pairs=96", "train.batch_size=32"), str(tmp_path / "tiny.yaml"))
    out = tmp_path / "bench.json"
    res = _bench("train", "--config", tmp_path / "tiny.yaml", "--data", small_sample, "--steps", 4, "--warmup", 1,
                 "--no-compiled", "--lora", 4, "--lora", 2, "--lora", 4, "--json", out)
    r = _stamped(out)
    for key in ("step_samples_per_s", "loop_samples_per_s", "loop_step_ratio", "flops_per_sample", "decode_ms",
                "sample_ms"):
        assert r[key] > 0, key
    assert {"step_compiled_samples_per_s", "batch_size", "device", "peak_mem_gib", "mfu"} <= r.keys()
    assert r["batch_size"] == 32 and r["workers_needed"] >= 1
    assert "2 epoch(s) of 3 batches" in res.output  # 5 timed+warm-up batches over 3-batch epochs
    assert [row["what"].split(" (")[0] for row in r["rows"]] == ["bare step, eager", "bare step, eager, LoRA rank 4",
                                                                  "bare step, eager, LoRA rank 2", "real loop, eager",
                                                                  "data, one core"]  # each rank timed once
    assert r["rows"][1]["of_full"] > 0 and "M trained)" in r["rows"][1]["what"]
    refused(muge("bench", "train", "--config", tmp_path / "tiny.yaml", "--data", small_sample, "--lora", 4, "--set",
                 "train.lora.text_targets=[nope]", "--json", tmp_path / "no.json"),
            "train.lora.text_targets=['nope']: no text tower Linear layer is named nope")
    assert not (tmp_path / "no.json").exists()
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0 and peak_tflops("NVIDIA A100-SXM4-40GB", "fp32") == 156
    assert peak_tflops("cpu", "fp32") is None


@pytest.mark.slow
def test_export_bench_runs_on_a_tiny_preset(tmp_path):
    """The benchmark itself (not its speed): builds, exports, times both encoders, outputs agree."""
    from bench.export import bench_preset

    preset = tmp_path / "tiny.yaml"
    save_config(tiny_config("dual"), str(preset))
    lines = []
    rows = bench_preset(str(preset), (1, 3), min_runs=1, budget_s=0.0, echo=lines.append, int8=True)
    assert [(r["encoder"], r["batch"]) for r in rows] == [("text", 1), ("text", 3), ("image", 1), ("image", 3)]
    keys = {"model", "encoder", "batch", "torch_ms", "ort_fp32_ms", "ort_int8_ms", "speedup_fp32", "speedup_int8",
            "fused_attention_nodes"}
    assert all(keys <= r.keys() and r["torch_ms"] > 0 and r["ort_fp32_ms"] > 0 and r["ort_int8_ms"] > 0
               and r["max_abs_diff_fp32"] < 1e-4 for r in rows)
    assert [r["fused_attention_nodes"] for r in rows] == [2, 2, 0, 0]  # the tiny BERT's 2 layers; a CNN has none
    assert len(lines) == 6  # an export line per encoder, a timing line per case
    assert bench_preset(str(preset), (2,), min_runs=1, budget_s=0.0, echo=lines.append)[0]["ort_int8_ms"] is None


@pytest.mark.slow
def test_gpu_check_small_runs_the_whole_chain_on_any_machine(tmp_path):
    """`muge bench gpu --small`: tiny shapes train, export through the gate and predict a repeated split."""
    out = tmp_path / "gpu.json"
    result = _bench("gpu", "--small", "--steps", 2, "--gallery", 150, "--queries", 30, "--workers", 1, "--work",
                    tmp_path / "work", "--json", out)
    rows = _stamped(out)["rows"]
    assert [r["model"] for r in rows] == ["bert-convnext", "cnclip-vit-b16"]
    for r in rows:
        assert r["gate_passed"] and r["gallery"] == 150 and r["queries"] == 30
        assert r["train_samples_per_s"] > 0 and r["gallery_images_per_s"] > 0 and r["predict_s"] > 0
        assert all(r[f"graph_images_per_s_{b}"] > 0 for b in (64, 128, 256))
    sub = tmp_path / "work" / "submissions" / "cnclip-vit-b16-test.jsonl"
    from competition import check_submission

    assert check_submission(tmp_path / "work" / "bench" / "MR_test_queries.jsonl", sub).ok
    assert "bert-convnext" in result.output and "gate_tie_aware" in result.output


@pytest.mark.slow
def test_quality_bench_scores_every_feature_and_reuses_its_runs(small_sample, tmp_path):
    config = tmp_path / "tiny.yaml"
    save_config(tiny_config("dual", "train.epochs=1", "eval.untrained=false"), str(config))
    args = ["quality", "--data", small_sample, "--config", config, "--work", tmp_path / "w", "--workers", 0,
            "--json", tmp_path / "q.json"]
    result = _bench(*args)
    rows = _stamped(tmp_path / "q.json")["rows"]
    assert len(rows) == 9 and rows[-1]["mean_recall"] is None  # no weights: zero-shot is not run
    assert all(0 <= r["mean_recall"] <= 100 and r["build_s"] > 0 for r in rows[:-1])
    assert rows[0]["delta_mr"] == 0 and rows[6]["weights"] is not None and "plain chain (run A)" in result.output
    seconds = (tmp_path / "w" / "seconds.json").read_text()
    _bench(*args, "--reuse")
    assert (tmp_path / "w" / "seconds.json").read_text() == seconds  # nothing retrained or re-exported
    assert [r["mean_recall"] for r in json.loads((tmp_path / "q.json").read_text())["rows"]] == \
        [r["mean_recall"] for r in rows]


@pytest.mark.slow
def test_lora_bench_fine_tunes_one_start_both_ways(small_sample, tmp_path):
    """A start trained on one sample and written as a transformers directory; a full and a LoRA
    fine-tune of it on another, each scored through the chain. What each trained is counted from
    its last.pt: every parameter for the full fine-tune, adapters, heads and multiplier for LoRA."""
    from competition import read_queries, score_predictions
    from infra.history import run_history
    from model.weights import load_checkpoint

    config = tmp_path / "tiny.yaml"
    save_config(tiny_config("chinese-clip", "train.epochs=1"), str(config))
    args = ["lora", "--data", small_sample, "--start-data", tmp_path / "easy", "--config", config, "--lora", 2,
            "--work", tmp_path / "w", "--workers", 0, "--json", tmp_path / "l.json"]
    result = _bench(*args)
    assert os.path.isfile(tmp_path / "easy" / "MR_valid_queries.jsonl")  # the start's sample, drawn
    start, full, lora = rows = _stamped(tmp_path / "l.json")["rows"]
    truth = read_queries(str(small_sample / "MR_valid_queries.jsonl"), require_ids=True)
    for row, name in zip(rows, ("start", "full", "lora-2")):  # each row's figures: its own submission's, scored
        with open(tmp_path / "w" / "submissions" / f"{name}-valid.jsonl", encoding="utf-8") as f:
            predicted = {r["query_id"]: r["item_ids"] for r in map(json.loads, f)}
        score = score_predictions(truth, predicted)
        assert (row["r1"], row["r5"], row["r10"], row["mean_recall"]) == (score.r1, score.r5, score.r10,
                                                                         score.mean_recall), name
    assert lora["delta_mr"] == lora["mean_recall"] - full["mean_recall"] and "LoRA rank 2" in result.output
    runs = tmp_path / "w" / "runs"
    weights = {name: load_checkpoint(str(runs / name / "last.pt"))["model"] for name in ("full", "lora-2")}
    assert full["trained"] == sum(t.numel() for t in weights["full"].values())
    assert lora["trained"] == sum(t.numel() for k, t in weights["lora-2"].items()
                                  if ".lora_" in k or "projection" in k or "logit_scale" in k) < full["trained"]
    assert full["last_pt_mib"] == os.path.getsize(runs / "full" / "last.pt") / 2**20
    untrained = [next(h for h in run_history(str(runs / n)) if h.epoch == 0).mean_recall for n in ("full", "lora-2")]
    assert untrained[0] == untrained[1]  # one start: both fine-tunes scored it alike before their first step
    seconds = (tmp_path / "w" / "seconds.json").read_text()
    _bench(*args, "--reuse")
    assert (tmp_path / "w" / "seconds.json").read_text() == seconds  # nothing retrained or re-exported


def test_the_lora_default_is_the_cheapest_exportable_setting_near_the_best():
    """The sweep's rule: the fewest trained parameters within DEFAULTS_WITHIN MR of the best LoRA row;
    a diverged row has no score, and a row whose bundle failed the parity gate is never chosen."""
    from bench.lora import DEFAULTS_WITHIN, add_shares

    rows = [{"mean_recall": 10.0}, {"mean_recall": 40.0},
            {"run": "best", "mean_recall": 35.0, "trained": 900, "train_s": 9},
            {"run": "cheap, gated", "mean_recall": 34.9, "trained": 100, "train_s": 1, "gated": True},
            {"run": "cheap", "mean_recall": 35.0 - DEFAULTS_WITHIN, "trained": 300, "train_s": 5},
            {"run": "cheapest, too far", "mean_recall": 33.9 - DEFAULTS_WITHIN, "trained": 50, "train_s": 1},
            {"run": "diverged", "note": "diverged"}]
    assert add_shares(rows)["run"] == "cheap"
    assert rows[2]["gain_kept"] == 25 / 30 and rows[4]["delta_mr"] == -5 - DEFAULTS_WITHIN
    assert "gain_kept" not in rows[-1]


def test_predict_bench_compares_the_pipeline_with_one_loop(tiny_bundle, small_sample, tmp_path):
    _bench("predict", "--bundle", tiny_bundle, "--data", small_sample, "--workers", 1, "--json", tmp_path / "p.json")
    rows = _stamped(tmp_path / "p.json")["rows"]
    assert len(rows) == 3 and all(r["images_per_s"] > 0 for r in rows)


def test_predict_bench_measures_the_pipeline_against_decode_only(small_sample, tmp_path):
    _bench("predict", "--pipeline", "--data", small_sample, "--gallery", 600, "--workers", 1, "--batch-size", 32,
           "--json", tmp_path / "p.json")
    body = _stamped(tmp_path / "p.json")
    decode, pipeline = body["rows"]
    assert decode["path"].startswith("decode only") and "stand-in" in pipeline["path"]
    assert body["gallery"] == 600 and body["workers"] == 1 and 0 < body["efficiency"]
    for row in (decode, pipeline):
        assert row["images_per_s"] > 0 and row["worker_cpu_ms_per_image"] > 0 and row["main_cpu_ms_per_image"] >= 0


@pytest.mark.parametrize("args, message", [
    (["tsv", "--size-mb", "0"], "--size-mb"), (["tsv", "--reads", "-5"], "--reads"),
    (["tsv", "--dir", "/nonexistent-muge"], "does not exist"),
    (["topk", "--gallery", "5"], "--gallery"), (["topk", "--dim", "0"], "--dim"),
    (["topk", "--queries", "-1"], "--queries"),
    (["export", "--batch", "0"], "--batch"), (["export", "--min-runs", "0"], "--min-runs"),
    (["export", "--threads", "0"], "--threads"), (["export", "--preset", "configs/nope.yaml"], "does not exist"),
    (["data", "--images", "-1"], "--images"), (["data", "--batch-size", "0"], "--batch-size"),
    (["data", "--main-limit-mb", "0"], "--main-limit-mb"),
    (["train", "--config", "configs/sample.yaml", "--steps", "0"], "--steps"),
    (["train", "--config", "configs/sample.yaml", "--data", "/nonexistent-muge"], "does not exist"),
    (["predict", "--bundle", "/nonexistent-muge"], "is not an export bundle"),
    (["predict", "--pipeline", "--data", "/nonexistent-muge"], "not found"),
    (["quality", "--pretrained", "/nonexistent-muge"], "not found"),
    (["topk", "--json", "/proc/nonexistent-muge/t.json"], "cannot write /proc/nonexistent-muge/t.json"),
    (["topk", "--json", "README.md"], "--json README.md is a file muge did not write as a bench table (JSON)"),
    (["topk", "--csv", "configs/sample.yaml"], "is a file muge did not write as a bench table (CSV)"),
    (["lora", "--lora-set", "train.lora.text_targets=[nope]"], "no text tower Linear layer is named nope"),
    (["lora", "--lora", "1000"], "train.lora.rank=1000 is above the width of the adapted layers (128)"),
    (["quality", "--work", "."], "--work . holds"),
    (["topk", "--json", "/proc/muge-t.json"], "cannot write /proc/muge-t.json"),
    (["predict", "--csv", "/proc/muge-t.csv"], "cannot write /proc/muge-t.csv"),
    (["scale", "--json", "/proc/muge-t.json"], "cannot write /proc/muge-t.json"),
    (["scale", "--mask-ratio", "nan"], "'nan' is not a number"),
    (["scale", "--mask-ratio", "0.5", "--stage", "export"], "a setting of the memory stage"),
    (["scale", "--stage", "predict"], "add --stage export"),
    (["scale", "--lora", "8", "--stage", "export"], "a setting of the memory stage"),
    (["scale", "--lora", "-1"], "-1 is not in the range x>=0"),
    (["train", "--config", "configs/sample.yaml", "--data", "configs", "--lora", "4", "--set", "train.lora.rank=8"],
     "the config already trains LoRA"),
    (["scale", "--work", "README.md/scale"], "--work"),
    (["train", "--config", "configs/sample.yaml", "--mask-ratio", "nan"], "'nan' is not a number"),
    (["train", "--config", "configs/sample.yaml", "--data", "configs", "--mask-ratio", "0.5"], "has no patch tokens"),
    (["quality", "--ema", "nan"], "'nan' is not a number"),
    (["lora", "--set", "train.lora.rank=4"], "leave train.lora.rank out of --set"),
    (["lora", "--set", "train.nope=1"], "train.nope"), (["lora", "--lora", "0"], "0 is not in the range x>=1"),
    (["lora", "--start", "/nonexistent-muge"], "not found"),
    (["loss", "--batch", "1"], "1 is not in the range x>=2"),
    (["scale", "--memory-model", "/tmp/muge-mm.json", "--stage", "memory"], "--lora 0 --lora RANK"),
    (["scale", "--memory-model", "README.md", "--stage", "memory", "--lora", "0", "--lora", "8"],
     "is a file muge did not write as a muge memory model"),
    (["loss", "--set", "train.loss=nope"], "train.loss='nope'"),
    (["data", "--pairs", "100"], "100 pairs do not fill one batch of --batch-size 128"),
    (["topk", "--csv", "/tmp"], "is a directory")])
def test_every_bench_checks_its_arguments_before_any_work(args, message):
    refused(muge("bench", *args), message)


def test_a_repeated_lora_rank_is_measured_once(monkeypatch, tmp_path):
    """`muge bench scale --lora 8 --lora 8`: one memory row for rank 8, as repeated presets and stages."""
    import bench.scale

    seen = []
    monkeypatch.setattr(bench.scale, "bench_one", lambda preset, work, data, opts, echo: seen.append(
        (preset, opts["lora"], sorted(opts["stages"]))) or [])
    monkeypatch.setattr(bench.scale, "small_split", lambda work, queries, images: str(tmp_path / "data"))
    accepted(muge("bench", "scale", "--preset", "cnclip-vit-b16", "--preset", "cnclip-vit-b16", "--stage", "memory",
                  "--stage", "memory", "--lora", 8, "--lora", 0, "--lora", 8, "--work", tmp_path / "w"))
    assert seen == [("cnclip-vit-b16", (8, 0), ["memory"])]


def test_bench_default_paths_are_the_checkouts_wherever_it_runs(tmp_path, monkeypatch):
    """A bench run from another directory finds its default presets (and names the checkout's
    data and bundle paths)."""
    from bench.data import bench_data
    from bench.export import bench_export
    from bench.lora import bench_lora
    from bench.predict import bench_predict
    from bench.quality import bench_quality

    monkeypatch.chdir(tmp_path)
    defaults = {(cmd.name, p.name): p.default for cmd in (bench_data, bench_export, bench_predict, bench_quality,
                                                           bench_lora)
                for p in cmd.params if p.name in ("config_path", "presets", "bundle_dir", "data_dir")}
    for (name, param), value in defaults.items():
        for path in (value if isinstance(value, tuple) else [value]):
            assert os.path.isabs(path) and path.startswith(ROOT), (name, param, path)
    assert all(os.path.isfile(p) for k, v in defaults.items() if k[1] in ("config_path", "presets")
               for p in (v if isinstance(v, tuple) else [v]))


@pytest.mark.slow
def test_loss_bench_compares_the_losses_at_each_batch_from_one_start(small_sample, tmp_path):
    """Full fine-tunes with each loss at a small batch and the preset's, from one trained start;
    each row's figures are its own submission's, scored, and vs_infonce the difference at its batch."""
    from competition import read_queries, score_predictions

    config = tmp_path / "tiny.yaml"
    save_config(tiny_config("chinese-clip", "train.epochs=1", "data.limit_pairs=64"), str(config))
    _bench("loss", "--data", small_sample, "--start-data", tmp_path / "easy", "--config", config, "--batch", 8,
           "--work", tmp_path / "w", "--workers", 0, "--json", tmp_path / "l.json")
    rows = _stamped(tmp_path / "l.json")["rows"]
    assert [(r["loss"], r["batch"]) for r in rows] == [("infonce", 8), ("sigmoid", 8), ("infonce", 32),
                                                       ("sigmoid", 32)]
    truth = read_queries(str(small_sample / "MR_valid_queries.jsonl"), require_ids=True)
    for row in rows:
        with open(tmp_path / "w" / "submissions" / f"{row['run_dir']}-valid.jsonl", encoding="utf-8") as f:
            predicted = {r["query_id"]: r["item_ids"] for r in map(json.loads, f)}
        assert row["mean_recall"] == score_predictions(truth, predicted).mean_recall
    by = {(r["loss"], r["batch"]): r["mean_recall"] for r in rows}
    assert rows[1]["vs_infonce"] == by["sigmoid", 8] - by["infonce", 8]


def test_the_memory_model_is_written_by_preset_and_rank_and_kept_for_the_others(tmp_path):
    """`muge bench scale --memory-model FILE`: each measured preset's entry (its batch, its rows by
    LoRA rank) laid over an earlier file's, the others kept, stamped with date, commit and machine."""
    from bench.scale import write_memory_model

    def row(preset, rank, state):
        figures = {"params": 10, "trainable": 10 if rank == 0 else 2, "state_bytes": state,
                   "per_pair_bytes": {"ckpt0-mask0": 5.0}}
        return {"preset": preset, "stage": "memory", "status": "ok",
                "figures": {"lora_rank": rank, "memory_model": figures}}

    path = tmp_path / "mm.json"
    write_memory_model(str(path), [row("cnclip-vit-b16", 0, 160), row("cnclip-vit-b16", 8, 60),
                                   row("cnclip-vit-h14", 0, 999), {"stage": "train", "status": "ok"}])
    write_memory_model(str(path), [row("cnclip-vit-h14", 0, 1600), {"preset": "cnclip-vit-h14", "stage": "memory",
                                                                    "status": "killed by signal 9"}])
    model = json.loads(path.read_text())
    assert model["kind"] == "muge memory model" and set(model["presets"]) == {"cnclip-vit-b16", "cnclip-vit-h14"}
    b16, h14 = model["presets"]["cnclip-vit-b16"], model["presets"]["cnclip-vit-h14"]
    assert b16["runs"]["8"]["state_bytes"] == 60 and h14["runs"]["0"]["state_bytes"] == 1600
    assert b16["batch_size"] == 256 and h14["batch_size"] == 1024 and h14["grad_checkpointing"] is True
    assert {"date", "commit", "machine"} <= h14["measured"].keys()
