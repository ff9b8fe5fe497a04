"""`muge bench topk` and `muge bench predict`: ours vs the obvious alternative, in one run."""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import click
import numpy as np


def _unit(rng, n, d):
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@click.command("topk")
@click.option("--queries", default=5004, show_default=True)
@click.option("--gallery", default=30588, show_default=True)
@click.option("--dim", default=512, show_default=True)
@click.option("--loop-queries", default=500, show_default=True, help="Queries timed for the per-query numpy loop.")
@click.option("--cnclip-queries", default=50, show_default=True,
              help="Queries timed for Chinese-CLIP's method (needs torch; 0 skips it).")
def bench_topk(queries, gallery, dim, loop_queries, cnclip_queries):
    """Exact top-10: blocked matmul + threshold prefilter vs two per-query baselines: a numpy
    loop with argpartition, and Chinese-CLIP's `make_topk_predictions.py` method (a torch matmul
    per query, then a Python sort of all (id, score) pairs)."""
    from competition.topk import exact_topk

    rng = np.random.default_rng(0)
    q, g = _unit(rng, queries, dim), _unit(rng, gallery, dim)
    exact_topk(q[:64], g)  # warm up BLAS threads
    t = time.perf_counter()
    _, ours = exact_topk(q, g, k=10)
    t_ours = time.perf_counter() - t
    n = min(loop_queries, queries)
    t = time.perf_counter()
    loop = []
    for row in q[:n]:
        s = g @ row
        top = np.argpartition(-s, 9)[:10]
        loop.append(top[np.argsort(-s[top], kind="stable")])
    t_loop = (time.perf_counter() - t) * queries / n
    agree = float(np.mean([set(a) == set(b) for a, b in zip(ours[:n].tolist(), np.array(loop).tolist())]))
    click.echo(f"top-10 of {queries} x {gallery} x {dim} (random unit vectors, {os.cpu_count()} CPUs)")
    click.echo(f"  ours (blocked matmul + prefilter): {t_ours:.2f}s  ({queries / t_ours:,.0f} queries/s)")
    click.echo(f"  per-query numpy loop (matmul + argpartition): {t_loop:.1f}s extrapolated from {n} queries "
               f"({queries / t_loop:,.0f} queries/s): ours x{t_loop / t_ours:.1f}; same top-10 sets on "
               f"{100 * agree:.1f}% of the timed queries")
    if cnclip_queries:
        t_cc, agree = _chinese_clip_topk(q, g, ours, min(cnclip_queries, queries))
        click.echo(f"  Chinese-CLIP's method (torch matmul per query, Python sort of all pairs): {t_cc * queries:.1f}s "
                   f"extrapolated from {min(cnclip_queries, queries)} queries ({1 / t_cc:,.0f} queries/s): ours "
                   f"x{t_cc * queries / t_ours:.1f}; same top-10 sets on {100 * agree:.1f}%")


def _chinese_clip_topk(q, g, ours, n: int) -> tuple[float, float]:
    """Seconds per query of Chinese-CLIP's eval/make_topk_predictions.py way, and agreement with ours."""
    import torch

    image_ids, image_feats = list(range(len(g))), torch.from_numpy(g)
    same, t = 0, time.perf_counter()
    for row, top in zip(q[:n], ours[:n].tolist()):
        score = (torch.from_numpy(row)[None] @ image_feats.t()).squeeze(0).tolist()
        pairs = sorted(zip(image_ids, score), key=lambda x: x[1], reverse=True)[:10]
        same += {i for i, _ in pairs} == set(top)
    return (time.perf_counter() - t) / n, same / n


@click.command("predict")
@click.option("--bundle", "bundle_dir", default="bundles/sample", show_default=True)
@click.option("--data", "data_dir", default="data/sample", show_default=True)
@click.option("--split", default="valid", show_default=True)
@click.option("--workers", default=max(1, (os.cpu_count() or 2) - 1), show_default=True)
def bench_predict(bundle_dir, data_dir, split, workers):
    """Gallery embedding: pipelined decode pool vs decode-then-embed in one loop; decode rate."""
    from competition import ImageTSV, resize_image
    from competition.layout import split_files

    from .embed import embed_gallery
    from .runtime import BundleEncoders

    enc = BundleEncoders(bundle_dir, "cpu", "fp32", batch_size=64)
    _, tsv_path = split_files(data_dir, split)
    tsv = ImageTSV(tsv_path)
    n = len(tsv)
    t = time.perf_counter()
    for img_id in tsv.ids.tolist():
        resize_image(tsv.load(img_id), 224, "squash")
    t_decode = time.perf_counter() - t
    t = time.perf_counter()
    batch = []
    for img_id in tsv.ids.tolist():
        batch.append(resize_image(tsv.load(img_id), enc.image_size, enc.resize_rule))
        if len(batch) == 64:
            enc.encode_images(np.stack(batch))
            batch = []
    if batch:
        enc.encode_images(np.stack(batch))
    t_seq = time.perf_counter() - t
    cache = tempfile.mkdtemp()
    try:
        t = time.perf_counter()
        embed_gallery(enc, tsv_path, cache, workers=workers)
        t_pipe = time.perf_counter() - t
    finally:
        shutil.rmtree(cache)
    click.echo(f"{n} gallery images of {tsv_path}, bundle {bundle_dir} ({enc.image_size}px, {enc.describe()}), "
               f"{os.cpu_count()} CPUs")
    click.echo(f"  decode + resize to 224px, one process: {n / t_decode:,.0f} images/s")
    click.echo(f"  sequential decode-then-embed: {n / t_seq:,.0f} images/s")
    click.echo(f"  pipelined ({workers} decode workers): {n / t_pipe:,.0f} images/s  (x{t_seq / t_pipe:.2f})")
