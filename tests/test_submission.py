import json

import numpy as np
import pytest

from competition import Query, SubmissionError, check_submission, write_submission
from competition.queries import write_queries

QUERIES = [Query(1, "红色连衣裙"), Query(2, "黑色双肩包"), Query(3, "")]
TEN = list(range(100, 110))


def test_writes_tianchi_schema_in_query_order(tmp_path):
    out = tmp_path / "sub" / "pred.jsonl"
    preds = {3: np.arange(200, 210), 1: TEN, 2: [np.int64(v) for v in range(300, 310)]}
    write_submission(out, QUERIES, preds)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [d["query_id"] for d in lines] == [1, 2, 3]
    assert lines[0] == {"query_id": 1, "query_text": "红色连衣裙", "item_ids": TEN}
    assert all(type(v) is int for d in lines for v in d["item_ids"])


def test_chinese_clip_schema(tmp_path):
    out = tmp_path / "pred.jsonl"
    other = list(range(300, 310))
    write_submission(out, QUERIES, {1: TEN, 2: other, 3: TEN[::-1]}, schema="chinese-clip")
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines == [{"text_id": 1, "text": "红色连衣裙", "image_ids": TEN},
                     {"text_id": 2, "text": "黑色双肩包", "image_ids": other},
                     {"text_id": 3, "text": "", "image_ids": TEN[::-1]}]
    assert list(lines[0]) == ["text_id", "text", "image_ids"]


@pytest.mark.parametrize("preds, message", [
    ({1: TEN, 2: TEN}, "1 query has no prediction: 3"),
    ({1: TEN[:9], 2: TEN, 3: TEN}, "exactly 10 ids, got 9"),
    ({1: TEN[:9] + [100], 2: TEN, 3: TEN}, "duplicate item ids [100]"),
    ({1: [str(v) for v in TEN], 2: TEN, 3: TEN}, "'100' at rank 1 is not an integer"),
    ({1: [True] + TEN[1:], 2: TEN, 3: TEN}, "True at rank 1 is not an integer"),
    ({1: [1.0] + TEN[1:], 2: TEN, 3: TEN}, "1.0 at rank 1 is not an integer"),
])
def test_refuses_invalid_and_writes_nothing(tmp_path, preds, message):
    out = tmp_path / "pred.jsonl"
    with pytest.raises(SubmissionError) as err:
        write_submission(out, QUERIES, preds)
    assert message in str(err.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_refusal_keeps_previous_file(tmp_path):
    out = tmp_path / "pred.jsonl"
    write_submission(out, QUERIES, {1: TEN, 2: TEN, 3: TEN})
    before = out.read_bytes()
    with pytest.raises(SubmissionError):
        write_submission(out, QUERIES, {1: TEN})
    assert out.read_bytes() == before


def test_check_submission_reports_every_problem(tmp_path):
    qpath = tmp_path / "q.jsonl"
    write_queries(qpath, [Query(i, f"q{i}") for i in range(1, 7)], with_ids=False)
    pred = tmp_path / "pred.jsonl"
    pred.write_text("\n".join([
        json.dumps({"query_id": 1, "item_ids": TEN}),
        "{not json",
        json.dumps({"query_id": "3", "item_ids": TEN}),
        json.dumps({"query_id": 4, "item_ids": TEN[:5]}),
        "",
        json.dumps({"query_id": 5, "item_ids": TEN[:9] + [TEN[0]]}),
        json.dumps({"query_id": 99, "item_ids": TEN}),
        json.dumps({"text_id": 6, "image_ids": TEN}),
    ]) + "\n")
    report = check_submission(qpath, pred)
    text = "\n".join(report.errors)
    assert not report.ok
    for expected in ("pred.jsonl:2: not valid JSON", "pred.jsonl:3: query_id '3' is not an integer",
                     "pred.jsonl:4: query 4: item_ids must hold exactly 10 ids, got 5",
                     "pred.jsonl:5: blank line", "pred.jsonl:6: query 5: duplicate item ids",
                     "pred.jsonl:8: a 'text_id' line in a file of 'query_id' lines (first on line 1); the "
                     "reference evaluator rejects mixed schemas",
                     "5 of 6 queries have no valid prediction: 2, 3, 4, 5, 6"):
        assert expected in text, expected
    assert any("not in" in w for w in report.warnings)  # query 99 is extra: ignored
    assert report.predictions.keys() == {1, 99}


def test_evaluator_edges_bom_big_ids_and_encoding(tmp_path):
    """Rejected here exactly when the reference evaluator rejects: a BOM, a non-UTF-8 line; an
    id of 2**70 is valid JSON and an int, so it is accepted (and matches no ground truth)."""
    qpath = tmp_path / "q.jsonl"
    write_queries(qpath, [Query(1, "a", (7,)), Query(2, "b", (8,))])
    lines = [json.dumps({"query_id": 1, "item_ids": [2**70] + TEN[1:]}), json.dumps({"query_id": 2, "item_ids": TEN})]
    pred = tmp_path / "pred.jsonl"
    pred.write_text("\n".join(lines) + "\n")
    assert check_submission(qpath, pred).ok
    pred.write_bytes(b"\xef\xbb\xbf" + pred.read_bytes())
    report = check_submission(qpath, pred)
    assert not report.ok and "pred.jsonl:1: starts with a UTF-8 byte-order mark" in report.errors[0]
    scored = check_submission(qpath, pred, allow_bom=True)  # `muge score` scores it, with a warning
    assert scored.ok and "byte-order mark" in scored.warnings[0]
    gbk_line = json.dumps({"query_id": 2, "query_text": "你", "item_ids": TEN}, ensure_ascii=False).encode("gbk")
    pred.write_bytes(lines[0].encode() + b"\n" + gbk_line + b"\n")
    report = check_submission(qpath, pred)
    assert not report.ok and any(e.startswith(f"{pred}:2: not UTF-8 text (byte 0xc4") for e in report.errors)
