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

import logging
import os
import time

import click

from infra.history import run_history

from .runs import export_run, predict_valid, timed_step, train_preset
from .table import FiniteFloatRange, emit, in_checkout, prepare_work, table_options

log = logging.getLogger(__name__)


def _ema_note(run_dir: str) -> str:
    history = [h for h in run_history(run_dir) if h.ema]
    trained = max(history, key=lambda h: h.mean_recall)
    ema = max(history, key=lambda h: h.ema["mean_recall"])
    holds = "EMA" if ema.ema["mean_recall"] > trained.mean_recall else "trained"
    return (f"best EMA MR {ema.ema['mean_recall']:.2f} (epoch {ema.epoch}), best trained "
            f"{trained.mean_recall:.2f} (epoch {trained.epoch}): best.pt holds the {holds} weights")


@click.command("quality")
@click.option("--data", "data_dir", **in_checkout("data/hard"),
              help="A MUGE directory; the hard sample is generated here when missing.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              **in_checkout("configs/sample.yaml"))
@click.option("--work", "work_dir", **in_checkout("runs/bench-quality"),
              help="Runs, bundles, submissions and caches of the bench.")
@click.option("--ema", "ema_decay", type=FiniteFloatRange(0, 1, min_open=True, max_open=True), default=0.98,
              show_default=True, help="train.ema of run C.")
@click.option("--pretrained", help="Chinese-CLIP weights (hub name or directory) for the zero-shot row.")
@click.option("--workers", type=click.IntRange(min=0), default=None, show_default="CPUs - 1, at least 1",
              help="Decode processes of each predict.")
@click.option("--reuse", is_flag=True, help="Keep runs and bundles already in --work.")
@table_options
def bench_quality(data_dir, config_path, work_dir, ema_decay, pretrained, workers, reuse, json_out, csv_out):
    """Train on the hard sample and score the plain chain and every quality feature on valid."""
    from competition.layout import split_paths
    from competition.sample import HARD, make_sample
    from infra.gallery import default_workers
    from train.average import average_runs

    workers = default_workers() if workers is None else workers

    if pretrained:  # before minutes of training: a local path must be there
        from model.tokenizer import TokenizerError, check_local_path

        try:
            check_local_path(pretrained, "the --pretrained weights")
        except TokenizerError as exc:
            raise click.BadParameter(str(exc), param_hint="--pretrained") from None
    prepare_work(work_dir, [data_dir, config_path, pretrained])
    if not os.path.isfile(split_paths(data_dir, "valid")[0]):
        log.info("drawing the hard sample into %s", data_dir)
        make_sample(data_dir, difficulty=HARD)
    runs, bundles = os.path.join(work_dir, "runs"), os.path.join(work_dir, "bundles")
    run = {k: os.path.join(runs, k) for k in ("a", "b", "c", "soup")}
    bundle = {k: os.path.join(bundles, k) for k in ("a", "b", "c", "soup", "zero-shot")}
    start = time.time()
    overrides = {"a": [], "b": ["train.data_seed=1"], "c": [f"train.ema={ema_decay}"]}
    build = {k: timed_step(work_dir, f"train-{k}", os.path.join(run[k], "best.pt"), reuse,
                           lambda k=k: train_preset(config_path, data_dir, run[k], overrides[k])) for k in overrides}
    build["soup"] = build["a"] + build["b"] + timed_step(
        work_dir, "average", os.path.join(run["soup"], "best.pt"), reuse,
        lambda: average_runs([run["a"], run["b"]], run["soup"]))
    for k in ("a", "b", "c", "soup"):
        build[k] += timed_step(work_dir, f"export-{k}", os.path.join(bundle[k], "manifest.json"), reuse,
                               lambda k=k: export_run(run[k], bundle[k], data_dir))
    a, ab = [bundle["a"]], [bundle["a"], bundle["b"]]
    mr = {k: max(h.mean_recall for h in run_history(run[k]) if h.scored) for k in ("a", "b")}
    plan = [("plain chain (run A)", a, {}, build["a"], ""),
            ("--tta hflip", a, {"tta": "hflip"}, build["a"], ""),
            ("--rerank qbnorm", a, {"rerank": "qbnorm"}, build["a"], "bank: the train queries"),
            ("--rerank dual-softmax", a, {"rerank": "dual-softmax"}, build["a"], "bank: the train queries"),
            (f"train.ema={ema_decay} (run C)", [bundle["c"]], {}, build["c"], _ema_note(run["c"])),
            ("ensemble A+B, equal weights", ab, {}, build["a"] + build["b"], "B: A with train.data_seed=1"),
            ("ensemble A+B, --weights auto", ab, {"weights": "auto"}, build["a"] + build["b"],
             lambda summary: f"weights {summary['weights']}, picked on valid itself (optimistic)"),
            ("muge average A B (soup)", [bundle["soup"]], {}, build["soup"],
             f"A {mr['a']:.2f} and B {mr['b']:.2f}, trained from one random init")]
    rows = []
    for i, (feature, bundles_used, options, seconds, note) in enumerate(plan):
        summary = predict_valid(bundles_used, data_dir, work_dir, f"row{i}", workers, **options)
        rows.append({"feature": feature, "build_s": seconds, "note": note(summary) if callable(note) else note,
                     **{k: summary.get(k) for k in ("r1", "r5", "r10", "mean_recall", "predict_s", "weights")}})
    if pretrained:
        seconds = timed_step(work_dir, "export-zero-shot", os.path.join(bundle["zero-shot"], "manifest.json"), reuse,
                             lambda: export_run(pretrained, bundle["zero-shot"], data_dir))
        summary = predict_valid([bundle["zero-shot"]], data_dir, work_dir, "zero-shot", workers)
        rows.append({"feature": f"zero-shot {pretrained}", "build_s": seconds,
                     **{k: summary.get(k) for k in ("r1", "r5", "r10", "mean_recall", "predict_s")}})
    else:
        rows.append({"feature": "zero-shot (--pretrained)", "mean_recall": None,
                     "note": "not run: no Chinese-CLIP weights given"})
    plain = rows[0]["mean_recall"]
    for r in rows:
        r["delta_mr"] = None if r.get("mean_recall") is None else r["mean_recall"] - plain
    columns = ("feature", "r1", "r5", "r10", "mean_recall", "delta_mr", "build_s", "predict_s", "weights", "note")
    emit([{k: r.get(k) for k in columns} for r in rows],
         title=f"muge bench quality on {data_dir} (valid); build_s: training and export of the row's bundles",
         json_out=json_out, csv_out=csv_out, extra={"data": data_dir},
         notes=[f"(bench quality in {time.time() - start:.0f}s; runs and bundles in {work_dir})"])
