"""The official MUGE metric: R@1/5/10 and MeanRecall (x100), plus MRR@10 and each query's first-hit rank.

A query is a hit at K when any ground-truth id is among its first K predictions; R@K divides by
the number of ground-truth queries. Vectorised: one `np.isin` over (query, item) keys.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import fits_int64
from .io import atomic_write_text
from .queries import Query


@dataclass
class Score:
    r1: float
    r5: float
    r10: float
    mean_recall: float
    mrr: float
    query_ids: np.ndarray      # [Q] ground-truth query ids, in ground-truth order
    first_hit: np.ndarray      # [Q] 1-based rank of the first hit within the top 10, 0 = miss

    def as_dict(self) -> dict:
        return {"r1": self.r1, "r5": self.r5, "r10": self.r10, "mean_recall": self.mean_recall, "mrr": self.mrr}

    def summary(self) -> str:
        return (f"R@1 {self.r1:.2f}  R@5 {self.r5:.2f}  R@10 {self.r10:.2f}  MR {self.mean_recall:.2f}  "
                f"MRR@10 {self.mrr:.2f}  ({len(self.query_ids)} queries)")


def score_predictions(ground_truth: Sequence[Query], preds: Mapping[int, Sequence[int]], k: int = 10) -> Score:
    """Score predictions against ground-truth queries. Missing predictions count as misses here;
    `muge score` rejects them first, as the reference evaluator does."""
    gts = [q for q in ground_truth if q.item_ids is not None]  # an empty list counts: a sure miss
    n = len(gts)
    if n == 0:
        raise ValueError("no ground-truth queries to score against")
    pred = np.zeros((n, k), dtype=np.int64)
    filled = np.zeros((n, k), dtype=bool)
    for row, q in enumerate(gts):
        for col, item in enumerate(list(preds.get(q.query_id, ()))[:k]):
            if fits_int64(item):  # a larger id (valid JSON, accepted by the evaluator) matches no ground truth
                pred[row, col] = item
                filled[row, col] = True
    gt_rows = np.repeat(np.arange(n, dtype=np.int64), [len(q.item_ids) for q in gts])
    gt_items = np.fromiter((i for q in gts for i in q.item_ids), dtype=np.int64, count=len(gt_rows))
    # dense ids so (row, item) fits one int64 key
    vocab = np.unique(np.concatenate([gt_items, pred.ravel()]))
    width = len(vocab) + 1
    gt_keys = gt_rows * width + np.searchsorted(vocab, gt_items)
    pred_keys = np.arange(n, dtype=np.int64)[:, None] * width + np.searchsorted(vocab, pred)
    hits = np.isin(pred_keys, gt_keys) & filled
    first = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0)

    def recall(at: int) -> float:
        return float(100.0 * np.mean((first > 0) & (first <= at)))

    r1, r5, r10 = recall(1), recall(5), recall(10)
    mrr = float(100.0 * np.mean(np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)))
    return Score(r1, r5, r10, (r1 + r5 + r10) / 3.0, mrr, np.array([q.query_id for q in gts]), first)


def success_json(score: Score) -> dict:
    """The reference evaluator's result on an accepted file."""
    mr = score.mean_recall
    return {"success": True, "score": mr,
            "scoreJson": {"score": mr, "mean_recall": mr, "r1": score.r1, "r5": score.r5, "r10": score.r10}}


def failure_json(message: str, detail: str = "") -> dict:
    """The reference evaluator's result on a rejected file."""
    return {"success": False, "score": 0, "scoreJson": {}, "errorMsg": message, "errorDetail": detail or message}


def write_result(path, result: dict) -> None:
    atomic_write_text(path, json.dumps(result, ensure_ascii=False) + "\n")
