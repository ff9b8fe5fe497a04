import json

import pytest

from competition import MugeDataError, read_queries
from competition.queries import ground_truth_not_in_gallery


def write(tmp_path, text, name="q.jsonl", encoding="utf-8"):
    p = tmp_path / name
    p.write_text(text, encoding=encoding)
    return p


def test_both_schemas_and_test_files(tmp_path):
    p = write(tmp_path, '{"query_id": 1, "query_text": "红色连衣裙", "item_ids": [10, 11]}\n'
                        '{"text_id": 2, "text": "黑色双肩包", "image_ids": [12]}\n'
                        '{"query_id": 3, "query_text": "白色T恤"}\n')
    qs = read_queries(p)
    assert [(q.query_id, q.text, q.item_ids) for q in qs] == [
        (1, "红色连衣裙", (10, 11)), (2, "黑色双肩包", (12,)), (3, "白色T恤", None)]
    assert [q.line for q in qs] == [1, 2, 3]


def test_bom_is_accepted(tmp_path):
    p = write(tmp_path, '{"query_id": 5, "query_text": "杯子"}\n', encoding="utf-8-sig")
    assert read_queries(p)[0].query_id == 5


@pytest.mark.parametrize("line2, message", [
    ('{"query_id": 2, "query_text": "x"', "not valid JSON: Expecting ',' delimiter (column 34)"),
    ('{"query_id": 2, "query_text": "x', "not valid JSON: Unterminated string starting at (column 31)"),
    ('{"query_text": "x"}', "missing field 'query_id'"),
    ('{"query_id": 2}', "missing field 'query_text'"),
    ('{"query_id": "2", "query_text": "x"}', "must be an integer"),
    ('{"query_id": 2.0, "query_text": "x"}', "must be an integer"),
    ('{"query_id": true, "query_text": "x"}', "must be an integer"),
    ('{"query_id": 2, "query_text": 7}', "must be a string"),
    ('{"query_id": 2, "query_text": "x", "item_ids": ["3"]}', "integers only"),
    ('{"query_id": 2, "query_text": "x", "item_ids": [true]}', "integers only"),
    ('{"query_id": 2, "query_text": "x", "item_ids": 5}', "must be a list of integers"),
    ('{"query_id": 2, "query_text": "x", "item_ids": [9223372036854775808]}', "does not fit in a signed 64-bit"),
    ('{"query_id": 9223372036854775808, "query_text": "x"}', "does not fit in a signed 64-bit"),
    ('{"query_id": 2, "query_text": "你"}'.encode("gbk"), "not UTF-8 text (byte 0xc4 at column 32)"),
    ('{"query_id": 1, "query_text": "again"}', "duplicate query id 1 (first seen on line 1)"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, line2, message):
    p = tmp_path / "q.jsonl"  # a bytes line2 (a GBK export) reaches the reader as it is
    p.write_bytes(b'{"query_id": 1, "query_text": "ok"}\n' + (line2 if isinstance(line2, bytes) else line2.encode())
                  + b"\n")
    with pytest.raises(MugeDataError) as err:
        read_queries(p)
    assert message in str(err.value)
    assert f"{p}:2:" in str(err.value)
    assert err.value.line == 2


def test_blank_lines_are_skipped_and_counted(tmp_path, caplog):
    """A trailing newline or two (or an empty line between) loses no query; the log says how many."""
    p = tmp_path / "q.jsonl"
    p.write_text('{"query_id": 1, "query_text": "a"}\n\n{"query_id": 2, "query_text": "b"}\n\n\n', encoding="utf-8")
    queries = read_queries(p)
    assert [(q.query_id, q.line) for q in queries] == [(1, 1), (2, 3)]
    assert f"{p}: skipped 3 blank lines (line 2, 4, 5)" in caplog.text
    p.write_text("\n\n", encoding="utf-8")
    with pytest.raises(MugeDataError, match="empty file"):
        read_queries(p)


def test_odd_text_survives_the_round_trip(tmp_path):
    """A lone surrogate (valid JSON, no character) and line separators inside a text: read, tokenised
    (the surrogate as U+FFFD) and written back escaped, one line per query, the text unchanged."""
    from competition.preprocess import normalize_text
    from competition.submission import write_submission

    texts = ["a\ud800b", "c\u2028d\u2029e\x85f", "普通"]
    p = tmp_path / "q.jsonl"
    p.write_text("".join(json.dumps({"query_id": i, "query_text": t}) + "\n" for i, t in enumerate(texts)))
    queries = read_queries(p)
    assert [q.text for q in queries] == texts and normalize_text(texts[0]) == "a\ufffdb"
    out = tmp_path / "sub.jsonl"
    write_submission(out, queries, {q.query_id: list(range(10)) for q in queries})
    raw = out.read_text(encoding="utf-8")
    assert len(raw.splitlines()) == 3 and "普通" in raw
    assert [json.loads(line)["query_text"] for line in raw.splitlines()] == texts


def test_empty_file(tmp_path):
    with pytest.raises(MugeDataError, match="empty file"):
        read_queries(write(tmp_path, ""))


def test_require_ids(tmp_path):
    p = write(tmp_path, '{"query_id": 1, "query_text": "ok"}\n')
    with pytest.raises(MugeDataError, match=r"q.jsonl:1: missing field 'item_ids'"):
        read_queries(p, require_ids=True)


def test_ground_truth_absent_from_gallery(tmp_path):
    p = write(tmp_path, json.dumps({"query_id": 1, "query_text": "a", "item_ids": [10, 99]}) + "\n")
    missing = ground_truth_not_in_gallery(read_queries(p), {10, 11}.__contains__)
    assert [(q.query_id, item) for q, item in missing] == [(1, 99)]


def test_empty_ground_truth_is_a_miss_with_a_warning(tmp_path, caplog):
    """As the reference evaluator: an empty item_ids list is accepted and scored as a miss."""
    from competition import score_predictions

    p = write(tmp_path, json.dumps({"query_id": 1, "query_text": "a", "item_ids": [10]}) + "\n"
              + json.dumps({"query_id": 2, "query_text": "b", "item_ids": []}) + "\n")
    queries = read_queries(p, require_ids=True)
    assert queries[1].item_ids == ()
    assert "1 query with an empty ground-truth list (line 2)" in caplog.text
    score = score_predictions(queries, {1: list(range(10, 20)), 2: list(range(10))})
    assert score.r1 == 50.0 and list(score.first_hit) == [1, 0]
