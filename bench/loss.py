"""`muge bench loss`: the sigmoid loss (SigLIP's, `train.loss: sigmoid`) against InfoNCE as a
small-batch remedy: full fine-tunes from one trained start (as `muge bench lora` makes it, and in
the same `--work`, so `--reuse` shares the start and the preset-batch InfoNCE run), the same
epochs on the hard sample, at a small batch and at the preset's; valid MR of each through the
ONNX chain. SigLIP reports its loss holding up at small batches where InfoNCE degrades; this
measures whether it does here.
"""
from __future__ import annotations

import os
import time

import click

from .lora import METRICS, best_record, check_fine_tunes, fine_tune_options, fine_tune_overrides, run_name, train_start
from .runs import export_run, predict_valid, timed_step, train_preset
from .table import emit, prepare_work, table_options


@click.command("loss")
@fine_tune_options
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=2), default=(32,), show_default=True,
              help="A batch size to compare the losses at, beside the preset's; repeat for more.")
@table_options
def bench_loss(data_dir, start_data, config_path, batches, overrides, work_dir, workers, reuse, json_out, csv_out):
    """The sigmoid loss against InfoNCE from one start, at a small batch and the preset's: valid MR of each."""
    from competition.layout import split_paths
    from competition.sample import EASY, HARD, make_sample
    from infra.gallery import default_workers
    from train.config import load_config

    workers = default_workers() if workers is None else workers
    check_fine_tunes(config_path, overrides, (), [], None)
    preset_batch = load_config(config_path, list(overrides)).train.batch_size
    sizes = tuple(dict.fromkeys((*batches, preset_batch)))
    settings = [[f"train.batch_size={b}", f"train.loss={loss}"] for b in sizes for loss in ("infonce", "sigmoid")]
    for lines in settings:
        try:
            load_config(config_path, [*overrides, *lines])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--batch/--set") from None
    prepare_work(work_dir, [data_dir, start_data, config_path])
    for path, difficulty in ((data_dir, HARD), (start_data, EASY)):
        if not os.path.isfile(split_paths(path, "valid")[0]):
            make_sample(path, difficulty=difficulty)
    t0 = time.time()
    runs, bundles, start = (os.path.join(work_dir, d) for d in ("runs", "bundles", "start-hf"))
    timed_step(work_dir, "train-start", os.path.join(start, "config.json"), reuse,
               lambda: train_start(config_path, start_data, os.path.join(runs, "start"), start))
    defaults = (f"model.name={start}", "model.text.tokenizer=null", "train.lora.rank=0", f"train.batch_size="
                f"{preset_batch}", "train.loss=infonce")
    rows = []
    for lines in settings:
        full = [*fine_tune_overrides(start, overrides, []), *lines]
        name = run_name("full", full, defaults)  # the preset's batch with InfoNCE: bench lora's full fine-tune
        seconds = timed_step(work_dir, f"train-{name}", os.path.join(runs, name, "best.pt"), reuse,
                             lambda n=name, x=full: train_preset(config_path, data_dir, os.path.join(runs, n), x))
        timed_step(work_dir, f"export-{name}", os.path.join(bundles, name, "manifest.json"), reuse,
                   lambda n=name: export_run(os.path.join(runs, n), os.path.join(bundles, n), data_dir))
        summary = predict_valid([os.path.join(bundles, name)], data_dir, work_dir, name, workers)
        rows.append({"loss": lines[1].split("=")[1], "batch": int(lines[0].split("=")[1]),
                     **{k: summary[k] for k in METRICS}, "best_epoch": best_record(os.path.join(runs, name)).epoch,
                     "train_s": seconds, "run_dir": name})
    infonce = {r["batch"]: r["mean_recall"] for r in rows if r["loss"] == "infonce"}
    for row in rows:
        row["vs_infonce"] = row["mean_recall"] - infonce[row["batch"]]
    epochs = load_config(config_path, list(overrides)).train.epochs
    emit(rows, title=f"muge bench loss: {config_path}, {epochs} epochs on {data_dir} from one start, full fine-tunes; "
                     "valid MR through the ONNX chain; vs_infonce against InfoNCE at the same batch",
         json_out=json_out, csv_out=csv_out, extra={"data": data_dir, "epochs": epochs, "overrides": list(overrides)},
         notes=[f"(bench loss in {time.time() - t0:.0f}s; runs and bundles in {work_dir})"])
