"""`muge bench topk`: our exact top-10 against two per-query baselines on the same vectors."""
from __future__ import annotations

import os
import time

import click
import numpy as np

from .table import emit, table_options


def unit_vectors(rng, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_loop_topk(queries: np.ndarray, gallery: np.ndarray, k: int = 10) -> list[np.ndarray]:
    """The obvious way: one matmul and an argpartition per query."""
    out = []
    for row in queries:
        s = gallery @ row
        top = np.argpartition(-s, k - 1)[:k]
        out.append(top[np.argsort(-s[top], kind="stable")])
    return out


def chinese_clip_topk(queries: np.ndarray, gallery: np.ndarray, k: int = 10) -> list[list[int]]:
    """Chinese-CLIP's eval/make_topk_predictions.py: a torch matmul per query, then a Python
    sort of every (image id, score) pair."""
    import torch

    image_ids, image_feats = list(range(len(gallery))), torch.from_numpy(gallery)
    out = []
    for row in queries:
        score = (torch.from_numpy(row)[None] @ image_feats.t()).squeeze(0).tolist()
        out.append([i for i, _ in sorted(zip(image_ids, score), key=lambda x: x[1], reverse=True)[:k]])
    return out


@click.command("topk")
@click.option("--queries", type=click.IntRange(min=1), default=5004, show_default=True)
@click.option("--gallery", type=click.IntRange(min=10), default=30588, show_default=True)
@click.option("--dim", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--loop-queries", type=click.IntRange(min=1), default=500, show_default=True,
              help="Queries timed for the per-query numpy loop.")
@click.option("--cnclip-queries", type=click.IntRange(min=0), default=50, show_default=True,
              help="Queries timed for Chinese-CLIP's method (needs torch; 0 skips it).")
@table_options
def bench_topk(queries, gallery, dim, loop_queries, cnclip_queries, json_out, csv_out):
    """Exact top-10: blocked matmul + threshold prefilter vs a per-query numpy loop and
    Chinese-CLIP's per-query method (their times extrapolated from the queries timed)."""
    from competition.topk import exact_topk

    rng = np.random.default_rng(0)
    q, g = unit_vectors(rng, queries, dim), unit_vectors(rng, gallery, dim)
    exact_topk(q[:64], g)  # warm up BLAS threads
    start = time.perf_counter()
    _, ours = exact_topk(q, g, k=10)
    ours_s = time.perf_counter() - start
    rows = [{"method": "ours: blocked matmul + prefilter", "queries_timed": queries, "seconds": round(ours_s, 3),
             "queries_per_s": round(queries / ours_s), "ours_faster_x": 1.0, "same_top10_sets": 1.0}]
    baselines = [("per-query numpy loop (matmul + argpartition)", numpy_loop_topk, loop_queries)]
    if cnclip_queries:
        baselines.append(("Chinese-CLIP's (torch matmul per query, Python sort)", chinese_clip_topk, cnclip_queries))
    for name, method, timed in baselines:
        n = min(timed, queries)
        start = time.perf_counter()
        top = method(q[:n], g)
        seconds = (time.perf_counter() - start) * queries / n
        same = float(np.mean([set(a) == set(b) for a, b in zip(ours[:n].tolist(), [list(t) for t in top])]))
        rows.append({"method": name, "queries_timed": n, "seconds": round(seconds, 2),
                     "queries_per_s": round(queries / seconds), "ours_faster_x": round(seconds / ours_s, 1),
                     "same_top10_sets": same})
    emit(rows, title=f"muge bench topk: top-10 of {queries:,} x {gallery:,} x {dim} (random unit vectors, "
                     f"{os.cpu_count()} CPUs; baselines' seconds extrapolated to every query)",
         json_out=json_out, csv_out=csv_out, extra={"queries": queries, "gallery": gallery, "dim": dim})
