"""Query-bank re-ranking at inference: QB-Norm and dual-softmax, still an exact top-K.

An image that is close to very many queries (a "hub") crowds the top 10 of queries it does not
match. Both methods look at how strongly a bank of other queries (the train queries: never the
ones being answered) is drawn to each gallery image and discount the hubs. With s(q, g) the
similarity, β an inverse temperature and, over the bank,

    log Z(g) = log Σ_b exp(β s(b, g)),

- `qbnorm`: querybank normalisation with the dynamic inverted softmax (Bogolin et al., CVPR
  2022): rank by β s(q, g) − log Z(g), the log of the inverted softmax. Only for a query whose
  plain top-1 image is in the bank's activation set (the images that are some bank query's
  top-1); any other query keeps its plain ranking, the paper's guard against normalising where
  the bank says nothing.
- `dual-softmax`: dual-softmax inference (Cheng et al., 2021): rank by s(q, g) · p(q | g), the
  softmax over queries for each image, taken over the bank plus the query itself, which is
  σ(β s(q, g) − log Z(g)) and so never overflows.

Both scores are functions of one (query, image) product and one number per image, so they are
ranked inside `exact_topk`'s blocks (`rescore`): exact, and never a full score matrix in memory.
They are computed in float64 with β at most `MAX_BETA`: with |s| <= 1 (L2-normalised
embeddings, ensemble weights summing to 1), β s − log Z stays above −(2 β + log B), so
exp(−(β s − log Z)) never overflows (for B up to 10^9 bank queries) and no two scores that differ
collapse into one. A larger β (1e6, say) would saturate float32 and tie most of the gallery.

Cost, for a bank of B queries and a gallery of G images of dimension D: one pass of B x G
products (`bank_stats`, cached per bank, gallery and β) in blocks of `bank_block x gallery_chunk`
float32 (128 MiB at the defaults) plus the bank itself (B x D float32: 512 MiB for MUGE's 250k
train queries at D = 512); the top-K then costs what a plain one does, its blocks rescored in
float64 (256 MiB at the defaults).
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from competition.topk import exact_topk

from .embed import cache_writable, load_npz, save_npz

log = logging.getLogger(__name__)
METHODS = ("qbnorm", "dual-softmax")
MAX_BETA = 300.0  # exp(2 * 300 + log 1e9) < float64's largest: see the module docstring


def check_beta(beta: float) -> float:
    if not (np.isfinite(beta) and 0 < beta <= MAX_BETA):
        raise ValueError(f"--rerank-beta {beta}: expected a number in (0, {MAX_BETA:g}] (trained CLIP logit scales "
                         f"are at most 100); beyond that the re-ranked scores lose their order")
    return beta


@dataclass
class BankStats:
    log_norm: np.ndarray  # [G] log Z(g), float64
    active: np.ndarray    # [G] bool: the image is some bank query's top-1


def bank_stats(bank: np.ndarray, gallery: np.ndarray, beta: float, bank_block: int = 1024,
               gallery_chunk: int = 32768) -> BankStats:
    """log Z(g) and the activation set in one blockwise pass over bank x gallery (a streaming
    log-sum-exp per image, a running argmax per bank query)."""
    n_gallery = len(gallery)
    peak = np.full(n_gallery, -np.inf)            # running max of β s(b, g) per image
    total = np.zeros(n_gallery)                   # Σ exp(β s(b, g) − peak)
    active = np.zeros(n_gallery, bool)
    for b0 in tqdm(range(0, len(bank), bank_block), desc="query bank", unit="block", leave=False):
        bb = np.ascontiguousarray(bank[b0:b0 + bank_block], dtype=np.float32)
        best = np.full(len(bb), -np.inf, np.float32)
        best_col = np.zeros(len(bb), np.int64)
        for g0 in range(0, n_gallery, gallery_chunk):
            g = np.ascontiguousarray(gallery[g0:g0 + gallery_chunk], dtype=np.float32)
            block = bb @ g.T
            col = block.argmax(axis=1)
            better = block[np.arange(len(bb)), col] > best
            best[better], best_col[better] = block[np.arange(len(bb)), col][better], col[better] + g0
            block *= np.float32(beta)
            cols = slice(g0, g0 + len(g))
            new_peak = np.maximum(peak[cols], block.max(axis=0))
            block -= new_peak.astype(np.float32)
            np.exp(block, out=block)  # <= 1: no overflow
            total[cols] = total[cols] * np.exp(peak[cols] - new_peak) + block.sum(axis=0, dtype=np.float64)
            peak[cols] = new_peak
        active[best_col] = True
    return BankStats(peak + np.log(total), active)


def cached_bank_stats(bank: np.ndarray, gallery: np.ndarray, beta: float, cache_root: str) -> BankStats:
    """`bank_stats`, kept on disk under a hash of the bank, the gallery and β."""
    h = hashlib.blake2b(digest_size=12)
    for arr in (bank, gallery):
        a = np.ascontiguousarray(arr, dtype=np.float32)
        h.update(str(a.shape).encode())
        h.update(memoryview(a).cast("B"))
    h.update(repr(float(beta)).encode())
    path = os.path.join(cache_root, "bank", f"{h.hexdigest()}.npz")
    cached = load_npz(path, "log_norm", "active")
    if cached is not None:
        log.info("query-bank statistics reused from %s", path)
        return BankStats(cached["log_norm"], cached["active"])
    t0 = time.time()
    stats = bank_stats(bank, gallery, beta)
    log.info("query bank: %d queries x %d images in %.1fs; %d images (%.0f%%) are some bank query's top-1",
             len(bank), len(gallery), time.time() - t0, int(stats.active.sum()), 100 * stats.active.mean())
    if cache_writable(os.path.dirname(path)):
        save_npz(path, log_norm=stats.log_norm, active=stats.active)
    return stats


def rescorer(method: str, queries: np.ndarray, gallery: np.ndarray, stats: BankStats, beta: float):
    """The `rescore(block, rows, cols)` that `exact_topk` ranks by for `method`."""
    if method not in METHODS:
        raise ValueError(f"unknown re-ranking {method!r}; expected one of {', '.join(METHODS)}")
    log_norm = np.asarray(stats.log_norm, dtype=np.float64)
    beta = float(check_beta(beta))
    if method == "dual-softmax":
        def dual_softmax(block, rows, cols):
            block = block.astype(np.float64)
            prior = log_norm[cols] - beta * block  # <= 2 beta + log B: exp stays finite (module docstring)
            np.exp(prior, out=prior)
            prior += 1
            return block / prior
        return dual_softmax
    _, top1 = exact_topk(queries, gallery, k=1)
    normalised = stats.active[top1[:, 0]]
    log.info("qbnorm: %d of %d queries have their top-1 image in the bank's activation set and are re-ranked",
             int(normalised.sum()), len(queries))

    def qbnorm(block, rows, cols):
        block = block.astype(np.float64)
        out = beta * block - log_norm[cols]
        keep = ~normalised[rows]
        out[keep] = block[keep]
        return out
    return qbnorm
