"""The official MUGE metric: R@1/5/10 and MeanRecall (x100), plus MRR@10 and each query's first-hit rank.

A query is a hit at K when any ground-truth id is among its first K predictions; R@K divides by
the number of ground-truth queries. Vectorised: one `np.isin` over (query, item) keys.
"""
from __future__ import annotations

import csv
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from infra.io import atomic_write_text
from infra.outputs import OutputKind, json_with_keys, read_head

from .errors import fits_int64
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
        return f"{score_line(self.as_dict())}  ({len(self.query_ids)} queries)"


def score_line(scores: Mapping[str, float]) -> str:
    """How every command prints a score (`Score.as_dict`'s keys)."""
    return (f"R@1 {scores['r1']:.2f}  R@5 {scores['r5']:.2f}  R@10 {scores['r10']:.2f}  "
            f"MR {scores['mean_recall']:.2f}  MRR@10 {scores['mrr']:.2f}")


def score_predictions(ground_truth: Sequence[Query], preds: Mapping[int, Sequence[int]], k: int = 10) -> Score:
    """Score predictions against ground-truth queries. Missing predictions count as misses here;
    `muge score` rejects them first, as the reference evaluator does. No Python work per query or
    per id: the lists are flattened once and every step after that is numpy."""
    gts = [q for q in ground_truth if q.item_ids is not None]  # an empty list counts: a sure miss
    n = len(gts)
    if n == 0:
        raise ValueError("no ground-truth queries to score against")
    top = [list(preds.get(q.query_id, ()))[:k] for q in gts]
    lengths = np.fromiter(map(len, top), dtype=np.int64, count=n)
    flat, fits = _int64_ids(list(itertools.chain.from_iterable(top)))
    rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    pred = np.zeros((n, k), dtype=np.int64)
    filled = np.zeros((n, k), dtype=bool)
    pred[rows, cols] = flat
    filled[rows, cols] = fits  # a larger id (valid JSON, accepted by the evaluator) matches no ground truth
    truth = [q.item_ids for q in gts]
    gt_rows = np.repeat(np.arange(n, dtype=np.int64), np.fromiter(map(len, truth), dtype=np.int64, count=n))
    gt_items = np.fromiter(itertools.chain.from_iterable(truth), dtype=np.int64, count=len(gt_rows))
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


def _int64_ids(ids: list) -> tuple[np.ndarray, np.ndarray]:
    """(ids as int64, which of them fit int64): ids beyond 64 bits become 0, marked unfit."""
    try:
        return np.array(ids, dtype=np.int64).reshape(-1), np.ones(len(ids), dtype=bool)
    except OverflowError:  # rare: some id beyond 64 bits; only then one check per id
        fits = np.fromiter(map(fits_int64, ids), dtype=bool, count=len(ids))
        return np.array([v if ok else 0 for v, ok in zip(ids, fits)], dtype=np.int64), fits


def per_query(score: Score, ground_truth: Sequence[Query]):
    """One row per scored query, for error analysis (a notebook, a spreadsheet): its id, text,
    first-hit rank (empty for a miss), hits at 1 / 5 / 10 and number of positives. A DataFrame."""
    import pandas as pd

    by_id = {q.query_id: q for q in ground_truth}
    rank = score.first_hit
    return pd.DataFrame({
        "query_id": score.query_ids, "query_text": [by_id[int(i)].text for i in score.query_ids],
        "first_hit_rank": pd.Series(rank, dtype="Int64").mask(rank == 0),
        "hit_at_1": (rank > 0) & (rank <= 1), "hit_at_5": (rank > 0) & (rank <= 5), "hit_at_10": rank > 0,
        "positives": [len(by_id[int(i)].item_ids) for i in score.query_ids]})


# a cell a spreadsheet would run as a formula (OWASP's list: a leading NUL is skipped by some readers)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\0")


def spreadsheet_csv(frame) -> str:
    """`frame` as CSV that Excel and WPS open safely and as written: UTF-8 with a BOM (else they
    show Chinese as mojibake), CRLF rows, every text cell quoted (so no CR, LF or Unicode line
    separator inside a text can break a row, whatever the reader), text cells that start like a
    formula prefixed with `'` (OWASP's CSV-injection rule), and lone surrogates (which the readers
    accept) written as `\\udXXX`, as the submission writer does."""
    def cell(value):
        if not isinstance(value, str):
            return value
        value = re.sub(r"[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", value)
        return "'" + value if value.startswith(FORMULA_STARTS) else value

    texts = frame.select_dtypes(include=["object", "string"]).columns
    safe = frame.assign(**{c: frame[c].map(cell) for c in texts})
    return "\ufeff" + safe.to_csv(index=False, lineterminator="\r\n", quoting=csv.QUOTE_NONNUMERIC)


def success_json(score: Score) -> dict:
    """The reference evaluator's result on an accepted file."""
    mr = score.mean_recall
    return {"success": True, "score": mr,
            "scoreJson": {"score": mr, "mean_recall": mr, "r1": score.r1, "r5": score.r5, "r10": score.r10}}


def failure_json(message: str, detail: str = "") -> dict:
    """The reference evaluator's result on a rejected file."""
    return {"success": False, "score": 0, "scoreJson": {}, "errorMsg": message, "errorDetail": detail or message}


RESULT = OutputKind("result file", directory=False,
                    recognise=lambda path: json_with_keys(path, "success", "score", "scoreJson"))
RANKS = OutputKind("ranks file", directory=False,
                   recognise=lambda path: json_with_keys(path, "query_id", "first_hit_rank", first_line=True))
PER_QUERY = OutputKind("per-query CSV", directory=False, recognise=lambda path: read_head(path, 4096).lstrip(
    "\ufeff").startswith('"query_id","query_text"'))


def write_result(path, result: dict) -> None:
    atomic_write_text(path, json.dumps(result, ensure_ascii=False) + "\n")
