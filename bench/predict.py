"""`muge bench predict`: the gallery pipeline of `muge predict`.

Default: a bundle's gallery embedding through the pipeline against decode-then-embed in one
loop, on the same gallery.

`--pipeline`: the pipeline alone, the image graph replaced by a stand-in that costs nothing, on a
gallery of `--gallery` 224 px images (the data's images repeated under new ids), against the same
gallery decoded with no model in the same run: images/s, the main process's CPU per image (all
that limits it on a fast accelerator), the decode workers' CPU per image, and the pipeline's
efficiency (its images/s over decode-only's, with the same workers).
"""
from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from types import SimpleNamespace

import click
import numpy as np

from .table import emit, in_checkout, table_options


def _cpu_s(who=resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


class StandInGraph:
    """What `predict.embed.embed_gallery` asks of a bundle's encoders, with an image graph that
    costs nothing: only the pipeline around it is timed."""

    def __init__(self, image_size: int, batch_size: int, dim: int = 512):
        self.image_size, self.resize_rule, self.batch_size, self.dim = image_size, "squash", batch_size, dim
        self.graph_hashes = {"image": "stand-in"}
        self.tokenizer = SimpleNamespace(max_length=52, normalization="stand-in")
        self.calls = 0

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.zeros((len(pixels), self.dim), np.float32)

    def require_finite(self, *args) -> None:
        pass


def measure(run, n: int) -> dict:
    """Wall images/s and CPU ms per image of this process and of its (joined) workers, for `run()`."""
    main, workers, start = _cpu_s(), _cpu_s(resource.RUSAGE_CHILDREN), time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    return {"images_per_s": round(n / seconds), "main_cpu_ms_per_image": round(1e3 * (_cpu_s() - main) / n, 4),
            "worker_cpu_ms_per_image": round(1e3 * (_cpu_s(resource.RUSAGE_CHILDREN) - workers) / n, 4)}


def bench_pipeline(data_dir: str, split: str, gallery: int, workers: int, batch_size: int, size: int,
                   json_out, csv_out) -> None:
    from competition import ImageTSV
    from infra.gallery import DecodeRing
    from predict.embed import embed_gallery

    from .gpu import write_repeated_split

    with tempfile.TemporaryDirectory() as tmp:
        tsv_path = os.path.join(write_repeated_split(data_dir, os.path.join(tmp, "data"), gallery, 10, split=split),
                                "MR_test_imgs.tsv")
        n = len(ImageTSV(tsv_path))  # the index, built once, outside the timings
        ranges = [(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]

        def decode_only():
            with DecodeRing(ImageTSV, tsv_path, size, "squash", batch_size, workers) as ring:
                for _ in ring.batches(ranges):
                    pass

        graph = StandInGraph(size, batch_size)
        decode = measure(decode_only, n)
        pipeline = measure(lambda: embed_gallery(graph, tsv_path, os.path.join(tmp, "cache"), workers=workers), n)
    efficiency = pipeline["images_per_s"] / decode["images_per_s"]
    # each image is decoded by one worker: its CPU per image against the main process's
    share = pipeline["main_cpu_ms_per_image"] / max(pipeline["worker_cpu_ms_per_image"], 1e-9)
    rows = [{"path": f"decode only, no model ({workers} workers)", **decode},
            {"path": "predict's pipeline, stand-in graph (ours)", **pipeline, "efficiency": round(efficiency, 3)}]
    emit(rows, title=f"muge bench predict --pipeline: {n:,} images at {size} px, batch {batch_size}, {workers} decode "
                     f"workers, {os.cpu_count()} CPUs", json_out=json_out, csv_out=csv_out,
         extra={"gallery": n, "workers": workers, "batch_size": batch_size, "image_size": size,
                "efficiency": efficiency, "main_over_worker": share},
         notes=[f"pipeline efficiency (predict img/s / decode-only img/s): {efficiency:.2f}",
                f"main process CPU per image = {share:.3f} x a decode worker's; the main process alone could feed "
                f"{1e3 / max(pipeline['main_cpu_ms_per_image'], 1e-9):,.0f} images/s to an accelerator"])


@click.command("predict")
@click.option("--bundle", "bundle_dir", **in_checkout("bundles/sample"),
              type=click.Path(file_okay=False))
@click.option("--data", "data_dir", **in_checkout("data/sample"),
              type=click.Path(file_okay=False))
@click.option("--split", default="valid", show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decode processes (default: predict's, every core but one).")
@click.option("--pipeline", is_flag=True, help="The pipeline alone: a stand-in graph, against decode-only.")
@click.option("--gallery", type=click.IntRange(min=1), default=30588, show_default=True,
              help="--pipeline: images in the gallery (the split's images repeated).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="--pipeline: images per batch (predict's CUDA default).")
@click.option("--size", type=click.IntRange(min=8), default=224, show_default=True,
              help="--pipeline: the image size the graph takes.")
@table_options
def bench_predict(bundle_dir, data_dir, split, workers, pipeline, gallery, batch_size, size, json_out, csv_out):
    """Gallery embedding: pipelined decode pool vs decode-then-embed in one loop; with --pipeline,
    the pipeline (stand-in graph) vs decode alone: images/s and CPU per image."""
    from competition import ImageTSV
    from competition.layout import split_files
    from infra.gallery import default_workers
    from predict.embed import embed_gallery
    from predict.runtime import BundleEncoders

    workers = default_workers() if workers is None else workers
    try:
        if not pipeline:  # the bundle, then the split's files, checked before any work
            BundleEncoders(bundle_dir, "cpu", "fp32", batch_size=64)
        split_files(data_dir, split)
    except (ValueError, OSError) as exc:  # MugeDataError, BundleError
        raise click.ClickException(str(exc)) from None
    if pipeline:
        return bench_pipeline(data_dir, split, gallery, workers, batch_size, size, json_out, csv_out)

    enc = BundleEncoders(bundle_dir, "cpu", "fp32", batch_size=64)
    _, tsv_path = split_files(data_dir, split)
    tsv = ImageTSV(tsv_path)
    n = len(tsv)
    start = time.perf_counter()
    for img_id in tsv.ids.tolist():
        tsv.load_pixels(img_id, enc.image_size, enc.resize_rule)
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    batch = []
    for img_id in tsv.ids.tolist():
        batch.append(tsv.load_pixels(img_id, enc.image_size, enc.resize_rule))
        if len(batch) == enc.batch_size:
            enc.encode_images(np.stack(batch))
            batch = []
    if batch:
        enc.encode_images(np.stack(batch))
    sequential_s = time.perf_counter() - start
    cache = tempfile.mkdtemp()
    try:
        start = time.perf_counter()
        embed_gallery(enc, tsv_path, cache, workers=workers)
        pipelined_s = time.perf_counter() - start
    finally:
        shutil.rmtree(cache)
    rows = [{"path": f"decode + resize to {enc.image_size} px only, one process", "images_per_s": round(n / decode_s)},
            {"path": "decode-then-embed in one loop", "images_per_s": round(n / sequential_s)},
            {"path": f"pipelined, {workers} decode worker(s) (ours)", "images_per_s": round(n / pipelined_s)}]
    emit(rows, title=f"muge bench predict: {n:,} images of {tsv_path}, bundle {bundle_dir} ({enc.describe()}), "
                     f"{os.cpu_count()} CPUs", json_out=json_out, csv_out=csv_out,
         notes=[f"pipelined / one loop: x{sequential_s / pipelined_s:.2f}"])
