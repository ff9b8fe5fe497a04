import json

import numpy as np
import pytest
from click.testing import CliRunner

from competition import Query, read_queries, score_predictions
from competition.cli import score as score_cmd
from competition.queries import write_queries


def pad(ids, filler=10_000):
    out = list(ids)
    while len(out) < 10:
        filler += 1
        if filler not in out:
            out.append(filler)
    return out[:10]


GT = [Query(1, "a", (5,)), Query(2, "b", (7, 8)), Query(3, "c", (9,)), Query(4, "d", (11, 12))]
# query 1: hit at rank 1; query 2: first hit at rank 3 (8); query 3: rank 7; query 4: miss
PRED = {1: pad([5]), 2: pad([1, 2, 8, 7]), 3: pad([20, 21, 22, 23, 24, 25, 9]), 4: pad([])}


def test_hand_computed_figures():
    s = score_predictions(GT, PRED)
    assert s.first_hit.tolist() == [1, 3, 7, 0]
    assert s.r1 == pytest.approx(25.0) and s.r5 == pytest.approx(50.0) and s.r10 == pytest.approx(75.0)
    assert s.mean_recall == pytest.approx(50.0)
    assert s.mrr == pytest.approx(100 * (1 + 1 / 3 + 1 / 7) / 4)


def test_extra_predictions_and_order_do_not_matter():
    preds = dict(reversed(list(PRED.items())))
    preds[999] = pad([5])
    assert score_predictions(list(reversed(GT)), preds).mean_recall == pytest.approx(50.0)


def _write_pred(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def _run(gt_path, pred_path, tmp_path):
    out = tmp_path / "result.json"
    res = CliRunner().invoke(score_cmd, [str(gt_path), pred_path, "--out", str(out), "--ranks",
                                         str(tmp_path / "ranks.jsonl"), "--per-query", str(tmp_path / "q.csv")])
    return res, json.loads(out.read_text())


@pytest.fixture
def gt_path(tmp_path):
    p = tmp_path / "gt.jsonl"
    write_queries(p, GT)
    return p


def test_cli_success_json(tmp_path, gt_path):
    lines = [{"query_id": q, "query_text": "", "item_ids": ids} for q, ids in PRED.items()]
    lines.append({"query_id": 77, "query_text": "extra", "item_ids": pad([])})  # ignored
    res, result = _run(gt_path, _write_pred(tmp_path / "p.jsonl", lines[::-1]), tmp_path)
    assert res.exit_code == 0, res.output
    assert result["success"] is True and result["score"] == pytest.approx(50.0)
    assert result["scoreJson"] == pytest.approx({"score": 50.0, "mean_recall": 50.0, "r1": 25.0, "r5": 50.0,
                                                 "r10": 75.0})
    ranks = [json.loads(x) for x in (tmp_path / "ranks.jsonl").read_text().splitlines()]
    assert [r["first_hit_rank"] for r in ranks] == [1, 3, 7, None]
    import pandas as pd

    table = pd.read_csv(tmp_path / "q.csv")  # one row per query, for a notebook
    assert table.columns.tolist() == ["query_id", "query_text", "first_hit_rank", "hit_at_1", "hit_at_5",
                                      "hit_at_10", "positives"]
    assert table["query_id"].tolist() == [1, 2, 3, 4] and table["query_text"].tolist() == ["a", "b", "c", "d"]
    assert table["first_hit_rank"].fillna(0).tolist() == [1, 3, 7, 0] and table["first_hit_rank"].isna().tolist()[3]
    assert table["hit_at_1"].tolist() == [True, False, False, False]
    assert table["hit_at_5"].tolist() == [True, True, False, False]
    assert table["hit_at_10"].tolist() == [True, True, True, False] and table["positives"].tolist() == [1, 2, 1, 2]
    assert 100 * table[["hit_at_1", "hit_at_5", "hit_at_10"]].mean().mean() == pytest.approx(result["score"])


@pytest.mark.parametrize("mutate, message", [
    (lambda lines: lines[:3], "1 of 4 queries have no valid prediction: 4"),
    (lambda lines: [dict(lines[0], item_ids=lines[0]["item_ids"][:9])] + lines[1:], "exactly 10 ids, got 9"),
    (lambda lines: [dict(lines[0], item_ids=[5] * 10)] + lines[1:], "duplicate item ids [5]"),
    (lambda lines: [dict(lines[0], item_ids=[str(v) for v in lines[0]["item_ids"]])] + lines[1:], "not an integer"),
])
def test_cli_failure_json(tmp_path, gt_path, mutate, message):
    lines = [{"query_id": q, "query_text": "", "item_ids": ids} for q, ids in PRED.items()]
    res, result = _run(gt_path, _write_pred(tmp_path / "p.jsonl", mutate(lines)), tmp_path)
    assert res.exit_code == 1
    assert result["success"] is False and result["score"] == 0 and result["scoreJson"] == {}
    assert message in result["errorMsg"] or message in result["errorDetail"]


def test_ground_truth_against_itself_is_100(tmp_path, small_sample):
    gt_path = small_sample / "MR_valid_queries.jsonl"
    gt = read_queries(gt_path)
    lines = [{"query_id": q.query_id, "query_text": q.text, "item_ids": pad(q.item_ids)} for q in gt]
    res, result = _run(gt_path, _write_pred(tmp_path / "p.jsonl", lines), tmp_path)
    assert res.exit_code == 0 and result["score"] == pytest.approx(100.0)


def _python_calls(fn) -> int:
    """How many Python-level function calls `fn()` makes (C functions not counted)."""
    import sys

    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_scoring_is_vectorised_whatever_the_query_count():
    """The Python work of scoring does not grow with the queries: 5,004 queries (the test split's
    size) cost the same number of Python calls as 50, where a per-query loop costs ~100x more."""
    rng = np.random.default_rng(0)

    def case(n):
        gt = [Query(i, "", tuple(rng.choice(30_000, 6, replace=False).tolist())) for i in range(n)]
        preds = {i: rng.choice(30_000, 10, replace=False).tolist() for i in range(n)}
        return lambda: score_predictions(gt, preds)

    small, big = _python_calls(case(50)), _python_calls(case(5004))
    assert big <= small + 10, (small, big)
    # the counter sees a per-query loop: the same scoring, one query at a time
    gt = [Query(i, "", (i,)) for i in range(50)]
    per_query = _python_calls(lambda: [score_predictions([q], {q.query_id: [q.query_id] * 10}) for q in gt])
    assert per_query >= 50 * small // 2
