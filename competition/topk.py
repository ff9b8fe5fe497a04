"""Exact top-K retrieval by inner product, for any gallery size in bounded memory.

For each (query block, gallery chunk) score block: split the chunk's columns into K groups; the
smallest of the K group maxima is a lower bound `t` on each row's K-th best score, so every
member of the top K (ties included) has score >= t. Only those few candidates are kept and
merged into a running top-K with an exact sort. Ties break deterministically: higher score
first, then lower gallery position. One pass of max and one of compare over each block instead
of a per-row partial sort. Shared by training-time evaluation and by `predict`.

Non-finite input (NaN or inf in a query or gallery row) is refused with `NonFiniteError`, which
names the first bad row: a NaN has no rank, and silently ranking it anywhere would hide a broken
model. So are finite inputs large enough for a score to overflow float32 (whether that gives inf
or NaN depends on the BLAS), checked by a bound before any product is computed. Callers that
know what a row is (an image id, a query id) check first with `first_nonfinite_row` and say so
in their own terms.
"""
from __future__ import annotations

import numpy as np


class NonFiniteError(ValueError):
    """An embedding (or a score computed from finite embeddings) is NaN or infinite."""


def first_nonfinite_row(x: np.ndarray) -> int | None:
    """Index of the first row of `x` holding a NaN or inf; None when every value is finite."""
    finite = np.isfinite(x)
    if finite.all():
        return None
    return int(np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1))[0])


def _checked_max(x: np.ndarray, what: str, offset: int = 0) -> tuple[float, int]:
    """Refuse a NaN/inf row of `x`; return its largest |value| and that value's row."""
    row = first_nonfinite_row(x)
    if row is not None:
        raise NonFiniteError(f"{what} row {offset + row} is not finite (NaN or inf): non-finite embeddings have "
                             "no rank")
    if not x.size:
        return 0.0, 0
    flat = int(np.abs(x).argmax())
    return float(abs(x.flat[flat])), offset + flat // x.shape[1]


def _refuse_overflow(dim: int, queries: tuple[float, int], gallery: tuple[float, int]) -> None:
    """|q . g| <= dim * max|q| * max|g|: refuse inputs whose float32 scores could overflow (to inf,
    or NaN from inf - inf, depending on the BLAS), before computing any."""
    if dim * queries[0] * gallery[0] > 1e38:
        raise NonFiniteError(f"scores would overflow float32: queries row {queries[1]} holds |values| up to "
                             f"{queries[0]:.3g} and gallery row {gallery[1]} up to {gallery[0]:.3g}; embeddings this "
                             "large are not L2-normalised")


def _require_finite(block: np.ndarray) -> np.ndarray:
    if not np.isfinite(block).all():
        raise NonFiniteError("re-ranked scores are not finite (NaN or inf)")
    return block


def _select(rows, scores, cols, k):
    """Keep, for each row, the k best (score desc, col asc) of flat candidate triples."""
    order = np.lexsort((cols, -scores, rows))
    rows, scores, cols = rows[order], scores[order], cols[order]
    first = np.searchsorted(rows, rows, side="left")
    keep = (np.arange(len(rows)) - first) < k
    return rows[keep], scores[keep], cols[keep]


def _block_candidates(scores: np.ndarray, k: int, floor: np.ndarray | None):
    n_cols = scores.shape[1]
    if n_cols <= k:
        rows, cols = np.indices(scores.shape).reshape(2, -1)
        return rows, scores.ravel(), cols
    bounds = (np.arange(k) * n_cols) // k
    threshold = np.maximum.reduceat(scores, bounds, axis=1).min(axis=1)
    if floor is not None:
        threshold = np.maximum(threshold, floor)
    rows, cols = np.nonzero(scores >= threshold[:, None])
    return rows, scores[rows, cols], cols


def exact_topk(queries: np.ndarray, gallery: np.ndarray, k: int = 10, gallery_chunk: int = 32768,
               query_block: int = 1024, rescore=None) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores [Q, k], gallery positions [Q, k]), best first, k <= len(gallery).

    Memory: one [query_block, gallery_chunk] float32 block at a time (128 MiB by default)
    whatever the sizes; `gallery` may be a memory-mapped array, read chunk by chunk.
    `rescore(block, rows, cols)`: the score to rank by, from a block of inner products and the
    query rows / gallery columns it covers (re-ranking, `predict.rerank`); it must be finite.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n_gallery = gallery.shape[0]
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"shape mismatch: queries {queries.shape}, gallery {gallery.shape}")
    q_max = _checked_max(queries, "queries")
    k = min(k, n_gallery)
    out_scores = np.empty((len(queries), k), dtype=np.float32)
    out_pos = np.empty((len(queries), k), dtype=np.int64)
    if k == 0:
        return out_scores, out_pos
    resident = n_gallery <= gallery_chunk  # one chunk: convert once, reuse for every query block
    g_all = np.ascontiguousarray(gallery, dtype=np.float32) if resident else None
    if resident:
        _refuse_overflow(queries.shape[1], q_max, _checked_max(g_all, "gallery"))
    for q0 in range(0, len(queries), query_block):
        qb = queries[q0:q0 + query_block]
        rows = np.empty(0, np.int64)
        vals = np.empty(0, np.float32)
        cols = np.empty(0, np.int64)
        floor = None
        for start in range(0, n_gallery, gallery_chunk):
            if resident:
                g = g_all
            else:
                g = np.ascontiguousarray(gallery[start:start + gallery_chunk], dtype=np.float32)
                if q0 == 0:  # the first query block reads every chunk: check each once
                    _refuse_overflow(queries.shape[1], q_max, _checked_max(g, "gallery", start))
            block = qb @ g.T
            if rescore is not None:
                block = _require_finite(rescore(block, slice(q0, q0 + len(qb)), slice(start, start + len(g))))
            r, s, c = _block_candidates(block, k, floor)
            rows, vals, cols = _select(np.concatenate([rows, r]), np.concatenate([vals, s]),
                                       np.concatenate([cols, c + start]), k)
            if len(rows) == len(qb) * k:  # every row has k: its k-th best bounds later chunks
                floor = vals.reshape(len(qb), k)[:, -1]
        out_scores[q0:q0 + len(qb)] = vals.reshape(len(qb), k)
        out_pos[q0:q0 + len(qb)] = cols.reshape(len(qb), k)
    return out_scores, out_pos


def predictions_from_positions(queries, gallery_ids: np.ndarray, positions: np.ndarray) -> dict[int, list[int]]:
    """query id -> the gallery ids at its row of top-K `positions` (as `exact_topk` returns them),
    for `queries` (`competition.Query`) in the order of the rows."""
    return {q.query_id: gallery_ids[row].tolist() for q, row in zip(queries, positions)}
