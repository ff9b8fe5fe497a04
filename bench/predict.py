"""`muge bench predict`: gallery embedding through predict's pipelined decode pool against
decode-then-embed in one loop, on the same gallery and bundle."""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import click
import numpy as np

from .table import emit, table_options


@click.command("predict")
@click.option("--bundle", "bundle_dir", default="bundles/sample", show_default=True)
@click.option("--data", "data_dir", default="data/sample", show_default=True)
@click.option("--split", default="valid", show_default=True)
@click.option("--workers", default=max(1, (os.cpu_count() or 2) - 1), show_default=True)
@table_options
def bench_predict(bundle_dir, data_dir, split, workers, json_out, csv_out):
    """Gallery embedding: pipelined decode pool vs decode-then-embed in one loop; decode rate."""
    from competition import ImageTSV, resize_image
    from competition.layout import split_files
    from predict.embed import embed_gallery
    from predict.runtime import BundleEncoders

    enc = BundleEncoders(bundle_dir, "cpu", "fp32", batch_size=64)
    _, tsv_path = split_files(data_dir, split)
    tsv = ImageTSV(tsv_path)
    n = len(tsv)
    start = time.perf_counter()
    for img_id in tsv.ids.tolist():
        resize_image(tsv.load(img_id), enc.image_size, enc.resize_rule)
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    batch = []
    for img_id in tsv.ids.tolist():
        batch.append(resize_image(tsv.load(img_id), enc.image_size, enc.resize_rule))
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
