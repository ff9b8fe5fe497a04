"""Ensembles: several bundles' similarities, weighted, ranked as one exact top-K.

Σ_i w_i q_i·g_i is the inner product of [w_1 q_1, ..., w_n q_n] with [g_1, ..., g_n], so a
weighted ensemble is one exact top-K over concatenated embeddings: no approximation, no score
matrix in memory, and a query bank (`predict.rerank`) concatenates the same way. Weights are
normalised to sum to 1, so the fused score stays on one bundle's scale.

`--weights auto` scores a coarse grid of weights on the valid split (each bundle's embeddings
cached as usual) and keeps the best MeanRecall.
"""
from __future__ import annotations

import itertools
import logging

import numpy as np

from competition import score_predictions
from competition.topk import exact_topk, predictions_from_positions

log = logging.getLogger(__name__)


def parse_weights(text: str | None, n: int) -> tuple[float, ...] | str:
    """"0.6,0.4" -> (0.6, 0.4) normalised; "auto" stays (up to `MAX_AUTO` bundles); None -> equal
    weights. Checked before anything is embedded."""
    if text is None:
        return (1.0 / n,) * n
    if text.strip() == "auto":
        weight_grid(n)  # refuses more bundles than the grid covers
        return "auto"
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--weights {text!r}: expected {n} comma-separated numbers or 'auto'") from None
    if len(weights) != n or any(not np.isfinite(w) or w < 0 for w in weights) or max(weights) <= 0:
        raise ValueError(f"--weights {text!r}: expected {n} finite non-negative numbers (one per --bundle), not all 0")
    top = max(weights)  # scaled by the largest first: the sum of huge weights cannot overflow to inf
    scaled = [w / top for w in weights]
    return tuple(w / sum(scaled) for w in scaled)


def fuse(parts: list[np.ndarray], weights=None) -> np.ndarray:
    """[w_1 x_1, ..., w_n x_n] (one bundle: `x_1` itself, untouched)."""
    if len(parts) == 1 and (weights is None or weights[0] == 1):
        return parts[0]
    weights = (1.0,) * len(parts) if weights is None else weights
    return np.concatenate([np.float32(w) * np.asarray(p, np.float32) for w, p in zip(weights, parts)], axis=1)


def align(ids: list[np.ndarray], features: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """One gallery order for every bundle: the first bundle's, restricted to the images every
    bundle embedded (they differ only when `--skip-bad-images` left different images out)."""
    if all(np.array_equal(ids[0], other) for other in ids[1:]):
        return ids[0], features
    common = set(ids[0].tolist()).intersection(*(set(i.tolist()) for i in ids[1:]))
    keep = np.array([i for i in ids[0].tolist() if i in common], dtype=ids[0].dtype)
    log.warning("the bundles embedded different images; the ensemble ranks the %d they share", len(keep))
    out = []
    for i, f in zip(ids, features):
        where = {int(x): r for r, x in enumerate(i.tolist())}
        out.append(f[[where[int(x)] for x in keep]])
    return keep, out


MAX_AUTO = 6


def weight_grid(n: int) -> list[tuple[float, ...]]:
    """Every weight vector on the simplex in steps of 1/10 (2-3 bundles) or 1/5 (4-6); more bundles
    than that need explicit --weights."""
    if n > MAX_AUTO:
        raise ValueError(f"--weights auto searches a grid for up to 6 bundles, not {n}: give the weights")
    steps = 10 if n <= 3 else 5
    return [tuple(c / steps for c in combo) for combo in itertools.product(range(steps + 1), repeat=n)
            if sum(combo) == steps]


def pick_weights(queries, query_parts: list[np.ndarray], gallery_ids: np.ndarray, gallery_parts: list[np.ndarray],
                 k: int = 10) -> tuple[tuple[float, ...], list[dict]]:
    """The grid point with the best MeanRecall on these (ground-truth) queries; ties go to the
    most even weights. Returns (weights, every point's scores)."""
    table = []
    for weights in weight_grid(len(query_parts)):
        _, pos = exact_topk(fuse(query_parts, weights), fuse(gallery_parts), k=k)
        score = score_predictions(queries, predictions_from_positions(queries, gallery_ids, pos))
        table.append({"weights": list(weights), **score.as_dict()})
    best = max(table, key=lambda r: (round(r["mean_recall"], 6), -float(np.ptp(r["weights"]))))
    return tuple(best["weights"]), table
