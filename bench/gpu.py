"""`muge bench gpu`: one command that shows a GPU box runs the whole chain at realistic shapes.

Two model shapes with random weights, so no network is needed:
- bert-convnext:  the `configs/bert-convnext.yaml` plan with a bert-base-shaped text tower
- cnclip-vit-b16: `configs/cnclip-vit-b16.yaml` with ViT-B/16 + RoBERTa-base-shaped towers
For each shape it runs, through the stages' own entry points and files:
1. training: two short epochs on the sample (AMP on CUDA); the second epoch's samples/s is
   the steady rate (the first pays for start-up and cuDNN autotuning);
2. export + parity gate (fp16 checked on CUDA);
3. the image graph alone at batch 64 / 128 / 256 (images/s of the fixed-shape ORT session);
4. predict on a test split of `--gallery` images (the sample's test images repeated under new
   ids) and `--queries` queries, from a cold cache: gallery images/s (decode + embed), top-K
   seconds, bundle-to-submission seconds.
`--small` uses tiny shapes and a small split, and runs on a CPU (the test suite runs it).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

import click
import numpy as np

from .shapes import BERT_BASE, TINY_BERT, TINY_CLIP, VIT_B16_CLIP, setting
from .table import emit, prepare_work, table_options

log = logging.getLogger(__name__)
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
RANDOM_TEXT = ["model.text.name=null", "model.text.tokenizer=char-vocab", "model.image.pretrained=false"]
SHAPES = {  # name -> (preset, overrides for realistic shapes, overrides for --small)
    "bert-convnext": ("bert-convnext.yaml", [*RANDOM_TEXT, setting("model.text.config", BERT_BASE)],
                      [*RANDOM_TEXT, setting("model.text.config", TINY_BERT), "model.image.name=resnet10t",
                       "model.embed_dim=32"]),
    "cnclip-vit-b16": ("cnclip-vit-b16.yaml",
                       ["model.name=null", "model.text.tokenizer=char-vocab", setting("model.config", VIT_B16_CLIP)],
                       ["model.name=null", "model.text.tokenizer=char-vocab", setting("model.config", TINY_CLIP)]),
}
SMALL = ["train.compile=null", "data.image_size=32", "data.max_text_length=24", "train.batch_size=16",
         "eval.batch_size=64"]  # compile: the default (on for CUDA only)
GRAPH_BATCHES = (64, 128, 256)


def write_repeated_split(sample_dir: str, out_dir: str, n_images: int, n_queries: int, split: str = "test") -> str:
    """A MUGE directory whose test split is `split`'s images and queries of the sample repeated
    under new ids (`n_images` lines, `n_queries` queries); train and valid are linked to the
    sample's."""
    from competition.layout import split_paths
    from competition.queries import Query, read_queries, write_queries
    from infra.io import atomic_path

    os.makedirs(out_dir, exist_ok=True)
    for linked in ("train", "valid"):
        for src, dst in zip(split_paths(sample_dir, linked), split_paths(out_dir, linked)):
            if not os.path.exists(dst):
                os.symlink(os.path.abspath(src), dst)
    (src_queries, src_tsv), (queries_path, tsv_path) = split_paths(sample_dir, split), split_paths(out_dir, "test")
    with open(src_tsv, "rb") as f:
        payloads = [line.split(b"\t", 1)[1] for line in f if line.strip()]
    with atomic_path(tsv_path) as tmp, open(tmp, "wb") as f:
        for i in range(n_images):
            f.write(b"%d\t" % (500_000_000 + i) + payloads[i % len(payloads)])
    texts = [q.text for q in read_queries(src_queries)]
    write_queries(queries_path, [Query(50_000_000 + i, texts[i % len(texts)]) for i in range(n_queries)],
                  with_ids=False)
    return out_dir


def graph_images_per_s(bundle: str, batch: int, seconds: float = 2.0) -> float:
    """The fixed-shape image session alone, on random pixels, after its warm-up."""
    from predict.runtime import BundleEncoders

    enc = BundleEncoders(bundle, batch_size=batch)
    enc.warmup()
    pixels = np.random.default_rng(0).integers(0, 256, (batch, enc.image_size, enc.image_size, 3), dtype=np.uint8)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        enc.encode_images(pixels)
        n += 1
    return n * batch / (time.perf_counter() - t0)


def check_shape(name: str, small: bool, sample_dir: str, bench_dir: str, work: str, steps: int, workers: int) -> dict:
    import torch

    from export.bundle import export_bundle
    from export.parity import ParityError
    from infra.history import run_history
    from predict.submit import PredictOptions, predict_split
    from train.config import load_config
    from train.main import train_run

    preset, big, tiny = SHAPES[name]
    cfg = load_config(os.path.join(CONFIGS, preset), [*(tiny + SMALL if small else big), "train.epochs=2",
                                                      "eval.untrained=false", f"data.workers={workers}",
                                                      "train.warmup_steps=5"])
    cfg.data.limit_pairs = steps * cfg.train.batch_size
    row = {"model": name, "batch_size": cfg.train.batch_size, "steps_per_epoch": steps}
    run_dir, bundle = os.path.join(work, "runs", name), os.path.join(work, "bundles", name)
    log.info("[%s] training 2 x %d steps of batch %d", name, steps, cfg.train.batch_size)
    start = time.time()
    train_run(cfg, sample_dir, run_dir)
    history = run_history(run_dir)
    row.update(train_s=round(time.time() - start, 1), train_samples_per_s=round(history[-1].samples_per_s, 1))
    if torch.cuda.is_available():
        row["train_peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.cuda.empty_cache()
    log.info("[%s] export + parity gate", name)
    start = time.time()
    try:
        parity = export_bundle(run_dir, bundle, sample_dir).parity
    except ParityError as err:
        parity = err.report.to_dict()
    fp16 = parity["fp16"] or {}
    row.update(export_s=round(time.time() - start, 1), gate_passed=parity["passed"], gate_device=parity["fp16_device"],
               gate_tie_aware=fp16.get("top10_tie_aware"), gate_overlap=fp16.get("top10_overlap"),
               gate_recall_delta=fp16.get("recall_delta"), gate_failures="; ".join(parity["failures"]))
    if not parity["passed"]:
        return row
    row.update({f"graph_images_per_s_{b}": round(graph_images_per_s(bundle, b), 1) for b in GRAPH_BATCHES})
    log.info("[%s] predict on %s (cold cache)", name, bench_dir)
    out = os.path.join(work, "submissions", f"{name}-test.jsonl")
    summary = predict_split(bundle, bench_dir, "test", out,
                            PredictOptions(workers=workers, cache_dir=os.path.join(work, "cache", name)))
    row.update(runtime=summary["runtime"], gallery=summary["gallery"], queries=summary["queries"],
               gallery_images_per_s=round(summary["gallery"] / summary["gallery_s"], 1),
               topk_s=summary["topk_s"], predict_s=summary["total_s"])
    return row


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs"
    return f"CPU only, {os.cpu_count()} CPUs"


@click.command("gpu")
@click.option("--small", is_flag=True, help="Tiny shapes and a small split: runs on a CPU in a minute or two.")
@click.option("--models", default=",".join(SHAPES), show_default=True, help="Comma-separated shapes to check.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Training steps per epoch (default 30, small 4).")
@click.option("--gallery", type=click.IntRange(min=10), default=None, help="Test images (default 30000, small 300).")
@click.option("--queries", type=click.IntRange(min=1), default=None, help="Test queries (default 5000, small 50).")
@click.option("--workers", type=click.IntRange(min=0), default=None, show_default="CPUs - 2, from 1 to 12",
              help="Data loader and decode processes.")
@click.option("--work", "work_dir", default=None, help="Keep the data, runs and bundles here (default: a temp dir).")
@table_options
def bench_gpu(small, models, steps, gallery, queries, workers, work_dir, json_out, csv_out):
    """The whole chain at realistic shapes on this GPU (or tiny ones on a CPU with --small): one table."""
    import torch

    from competition.layout import split_paths
    from competition.sample import make_sample

    names = [m.strip() for m in models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        raise click.BadParameter(f"unknown model {unknown[0]!r}; expected one of {', '.join(SHAPES)}",
                                 param_hint="--models")
    if not small and not torch.cuda.is_available():
        raise click.ClickException("no CUDA GPU visible: the realistic shapes need one (use --small on a CPU)")
    if workers is None:
        from infra.gallery import available_cores

        workers = max(1, min(12, available_cores() - 2))
    steps = steps or (4 if small else 30)
    gallery, queries = gallery or (300 if small else 30_000), queries or (50 if small else 5_000)
    work = prepare_work(work_dir) if work_dir else tempfile.mkdtemp(prefix="muge-gpu-check-")
    try:
        sample_dir = os.path.join(work, "sample")
        if not os.path.isfile(split_paths(sample_dir, "test")[0]):
            sizes = dict(n_train_queries=240, n_eval_queries=40, gallery_size=120) if small else {}
            make_sample(sample_dir, seed=1, **sizes)
        bench_dir = write_repeated_split(sample_dir, os.path.join(work, "bench"), gallery, queries)
        rows = [check_shape(name, small, sample_dir, bench_dir, work, steps, workers) for name in names]
    finally:
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)
    emit(rows, title=f"muge bench gpu on {device_name()}: train, export + gate, image graph, predict a "
                     f"{gallery:,}-image / {queries:,}-query split from a cold cache",
         json_out=json_out, csv_out=csv_out, extra={"device": device_name()})
    if not all(r["gate_passed"] for r in rows):
        raise SystemExit(1)
