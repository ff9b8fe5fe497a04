"""The steps the quality benches share (`muge bench quality`, `muge bench lora`): train a preset,
export a run, predict valid from an empty cache. `timed_step` keeps each step's seconds in
`WORK/seconds.json`, so `--reuse` skips a step whose output is already there."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time

log = logging.getLogger(__name__)


def timed_step(work: str, key: str, done: str, reuse: bool, fn) -> float:
    """Run `fn` and record its seconds in `work/seconds.json`; with `reuse`, skip it when `done`
    exists and its seconds are on record."""
    path = os.path.join(work, "seconds.json")
    times = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            times = json.load(f)
    if reuse and os.path.exists(done) and key in times:
        return times[key]
    t0 = time.time()
    fn()
    times[key] = time.time() - t0
    os.makedirs(work, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(times, f, indent=1)
    return times[key]


def train_preset(cfg_path: str, data: str, run_dir: str, overrides: list[str]) -> None:
    """A fresh run of the preset at `cfg_path` with `overrides` (`--set` lines) in `run_dir`."""
    from train.config import load_config
    from train.main import train_run

    shutil.rmtree(run_dir, ignore_errors=True)
    log.info("training %s (%s)", run_dir, " ".join(overrides) or "the preset as it is")
    train_run(load_config(cfg_path, overrides), data, run_dir)


def export_run(source: str, bundle: str, data: str) -> None:
    """The ONNX bundle of a run directory, or of published weights (a hub name or directory)."""
    from export.bundle import export_bundle

    export_bundle(source, bundle, data)


def predict_valid(bundles: list[str], data: str, work: str, name: str, workers: int, **options) -> dict:
    """Predict valid with `bundles` from an empty embedding cache; the scored summary, with
    `predict_s` (the whole cost of predicting that way)."""
    from predict.submit import PredictOptions, predict_split

    cache = os.path.join(work, "cache", name)
    shutil.rmtree(cache, ignore_errors=True)
    opts = PredictOptions(workers=workers, cache_dir=cache, **options)
    start = time.time()
    summary = predict_split(bundles, data, "valid", os.path.join(work, "submissions", f"{name}-valid.jsonl"), opts)
    summary["predict_s"] = time.time() - start
    return summary
