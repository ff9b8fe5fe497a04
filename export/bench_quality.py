"""`muge bench quality` (`make bench-quality`): what each quality feature is worth, in one table.

On the hard sample (`muge sample --hard`, generated when missing) it trains the preset three
times: A (the plain run), B (the same start, another `train.data_seed`) and C (A with
`train.ema`); exports A, B, C and the soup of A and B; and predicts valid through the ONNX chain
for the plain bundle and for every feature: TTA, both re-rankings, EMA, the ensemble of A and B
(equal weights, and `auto`, whose weights are picked on valid itself, so optimistic), the soup,
and a zero-shot export where `--pretrained` names weights. Each predict row starts from an empty
embedding cache, so its seconds are the whole cost of predicting that way; `train+export s` is
what the row's bundles cost to make. Runs and bundles are kept under `--work`, and reused when
`--reuse` is given.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time

import click

log = logging.getLogger(__name__)


def _train(cfg_path: str, data: str, run_dir: str, overrides: list[str], reuse: bool) -> float:
    from train.main import run
    from train.params import load_config

    stamp = os.path.join(run_dir, "bench-seconds.json")
    if reuse and os.path.isfile(os.path.join(run_dir, "best.pt")) and os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as f:
            return json.load(f)["seconds"]
    shutil.rmtree(run_dir, ignore_errors=True)
    log.info("training %s (%s)", run_dir, " ".join(overrides) or "the preset as it is")
    t0 = time.time()
    run(load_config(cfg_path, overrides), data, run_dir)
    seconds = time.time() - t0
    with open(stamp, "w", encoding="utf-8") as f:
        json.dump({"seconds": seconds}, f)
    return seconds


def _export(run_dir: str | None, bundle: str, data: str, reuse: bool, pretrained: str | None = None) -> float:
    from .bundle import export_bundle
    from .pretrained import pretrained_run

    if reuse and os.path.isfile(os.path.join(bundle, "manifest.json")):
        return 0.0
    t0 = time.time()
    if pretrained:
        run_dir = bundle + ".weights"
        shutil.rmtree(run_dir, ignore_errors=True)
        pretrained_run(pretrained, run_dir)
    try:
        export_bundle(run_dir, bundle, data)
    finally:
        if pretrained:
            shutil.rmtree(run_dir, ignore_errors=True)
    return time.time() - t0


def _predict(bundles: list[str], data: str, work: str, name: str, workers: int, **options) -> dict:
    from predict.submit import PredictOptions, predict_split

    cache = os.path.join(work, "cache", name)
    shutil.rmtree(cache, ignore_errors=True)
    opts = PredictOptions(workers=workers, cache_dir=cache, **options)
    t0 = time.time()
    summary = predict_split(bundles, data, "valid", os.path.join(work, "submissions", f"{name}-valid.jsonl"), opts)
    summary["predict_seconds"] = time.time() - t0
    return summary


def format_rows(rows: list[dict], data: str) -> str:
    plain = rows[0]["mean_recall"]
    lines = [f"muge bench quality on {data} (valid)",
             "| feature | R@1 | R@5 | R@10 | MR | ΔMR | train+export s | predict s |", "|" + "---|" * 8]
    for r in rows:
        if r.get("mean_recall") is None:
            lines.append(f"| {r['feature']} | | | | n/a | | | {r.get('note', '')} |")
            continue
        lines.append(f"| {r['feature']} | {r['r1']:.2f} | {r['r5']:.2f} | {r['r10']:.2f} | {r['mean_recall']:.2f} | "
                     f"{r['mean_recall'] - plain:+.2f} | {r['build_seconds']:.0f} | {r['predict_seconds']:.1f} |")
    return "\n".join(lines)


@click.command("quality")
@click.option("--data", "data_dir", default="data/hard", show_default=True,
              help="A MUGE directory; the hard sample is generated here when missing.")
@click.option("--config", "config_path", default="configs/sample.yaml", show_default=True)
@click.option("--work", "work_dir", default="runs/bench-quality", show_default=True,
              help="Runs, bundles, submissions and caches of the bench.")
@click.option("--ema", "ema_decay", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.98,
              show_default=True, help="train.ema of run C.")
@click.option("--pretrained", help="Chinese-CLIP weights (hub name or directory) for the zero-shot row.")
@click.option("--workers", type=click.IntRange(min=0), default=max(1, (os.cpu_count() or 2) - 1), show_default=True)
@click.option("--reuse", is_flag=True, help="Keep runs and bundles already in --work.")
@click.option("--json", "json_out", help="Also write the rows as JSON here.")
def bench_quality(data_dir, config_path, work_dir, ema_decay, pretrained, workers, reuse, json_out):
    """Train on the hard sample and score the plain chain and every quality feature on valid."""
    from competition.io import atomic_write_text
    from competition.layout import split_paths
    from competition.sample import HARD, make_sample
    from train.average import average_runs

    if not os.path.isfile(split_paths(data_dir, "valid")[0]):
        log.info("drawing the hard sample into %s", data_dir)
        make_sample(data_dir, difficulty=HARD)
    runs, bundles = os.path.join(work_dir, "runs"), os.path.join(work_dir, "bundles")
    run = {k: os.path.join(runs, k) for k in ("a", "b", "c", "soup")}
    bundle = {k: os.path.join(bundles, k) for k in ("a", "b", "c", "soup", "zero-shot")}
    t0 = time.time()
    build = {"a": _train(config_path, data_dir, run["a"], [], reuse),
             "b": _train(config_path, data_dir, run["b"], ["train.data_seed=1"], reuse),
             "c": _train(config_path, data_dir, run["c"], [f"train.ema={ema_decay}"], reuse)}
    t_soup = time.time()
    average_runs([run["a"], run["b"]], run["soup"])
    build["soup"] = build["a"] + build["b"] + time.time() - t_soup
    for k in ("a", "b", "c", "soup"):
        build[k] += _export(run[k], bundle[k], data_dir, reuse)
    a = [bundle["a"]]
    plan = [("plain chain (run A)", a, {}, build["a"]),
            ("--tta hflip", a, {"tta": "hflip"}, build["a"]),
            ("--rerank qbnorm", a, {"rerank": "qbnorm"}, build["a"]),
            ("--rerank dual-softmax", a, {"rerank": "dual-softmax"}, build["a"]),
            (f"train.ema={ema_decay} (run C)", [bundle["c"]], {}, build["c"]),
            ("ensemble A+B, equal weights", [bundle["a"], bundle["b"]], {}, build["a"] + build["b"]),
            ("ensemble A+B, --weights auto (picked on valid)", [bundle["a"], bundle["b"]], {"weights": "auto"},
             build["a"] + build["b"]),
            ("muge average A B (soup)", [bundle["soup"]], {}, build["soup"])]
    rows = []
    for i, (feature, bundles_used, options, seconds) in enumerate(plan):
        summary = _predict(bundles_used, data_dir, work_dir, f"row{i}", workers, **options)
        rows.append({"feature": feature, "build_seconds": seconds, **{k: summary.get(k) for k in (
            "r1", "r5", "r10", "mean_recall", "predict_seconds", "weights")}})
    if pretrained:
        seconds = _export(None, bundle["zero-shot"], data_dir, reuse, pretrained=pretrained)
        summary = _predict([bundle["zero-shot"]], data_dir, work_dir, "zero-shot", workers)
        rows.append({"feature": f"zero-shot {pretrained}", "build_seconds": seconds,
                     **{k: summary.get(k) for k in ("r1", "r5", "r10", "mean_recall", "predict_seconds")}})
    else:
        rows.append({"feature": "zero-shot (--pretrained)", "mean_recall": None,
                     "note": "not run: no Chinese-CLIP weights given"})
    click.echo(format_rows(rows, data_dir))
    click.echo(f"(bench quality in {time.time() - t0:.0f}s; runs and bundles in {work_dir})")
    if json_out:
        atomic_write_text(json_out, json.dumps({"data": data_dir, "rows": rows}, indent=2) + "\n")
