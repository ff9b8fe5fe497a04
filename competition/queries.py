"""Readers for MUGE query files (jsonl) in the Tianchi and the Chinese-CLIP schemas.

Tianchi:      {"query_id": 8428, "query_text": "高级感托特包斜挎", "item_ids": [1076345, 517602]}
Chinese-CLIP: {"text_id": 8428, "text": "高级感托特包斜挎", "image_ids": [1076345, 517602]}
Test files carry no ids. Every problem is reported with the file and line it was found on.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .errors import MugeDataError, first_of, fits_int64, is_int_id

log = logging.getLogger(__name__)
UTF8_BOM = b"\xef\xbb\xbf"

# schema name -> (id field, text field, ground-truth ids field)
SCHEMAS = {
    "tianchi": ("query_id", "query_text", "item_ids"),
    "chinese-clip": ("text_id", "text", "image_ids"),
}


@dataclass(frozen=True)
class Query:
    query_id: int
    text: str
    item_ids: tuple[int, ...] | None = None  # None for test queries
    line: int = 0


def detect_schema(obj: dict) -> str | None:
    """The schema whose id field the line holds (None: neither)."""
    for name, (id_field, _, _) in SCHEMAS.items():
        if id_field in obj:
            return name
    return None


def parse_query_line(raw: str, path, lineno: int, require_ids: bool | None) -> tuple[Query, str]:
    """Parse one jsonl line (not blank: `iter_queries` skips those) into a Query and the schema it used."""
    try:
        obj = json.loads(raw.rstrip("\r\n"))  # the line's own columns in the error, not the next line's
    except json.JSONDecodeError as exc:
        raise MugeDataError(path, f"not valid JSON: {exc.msg} (column {exc.colno})", lineno) from None
    if not isinstance(obj, dict):
        raise MugeDataError(path, f"expected a JSON object, got {type(obj).__name__}", lineno)
    schema = detect_schema(obj)
    if schema is None:
        raise MugeDataError(path, "missing field 'query_id' (or 'text_id' in the Chinese-CLIP schema)", lineno)
    id_field, text_field, ids_field = SCHEMAS[schema]
    qid = obj[id_field]
    if not is_int_id(qid):
        raise MugeDataError(path, f"'{id_field}' must be an integer, got {qid!r}", lineno)
    if not fits_int64(qid):
        raise MugeDataError(path, f"'{id_field}' {qid} does not fit in a signed 64-bit integer", lineno)
    if text_field not in obj:
        raise MugeDataError(path, f"missing field '{text_field}'", lineno)
    text = obj[text_field]
    if not isinstance(text, str):
        raise MugeDataError(path, f"'{text_field}' must be a string, got {text!r}", lineno)
    item_ids = None
    if ids_field in obj:
        ids = obj[ids_field]
        if not isinstance(ids, list):  # an empty list is a query no prediction can hit, as the evaluator scores it
            raise MugeDataError(path, f"'{ids_field}' must be a list of integers, got {ids!r}", lineno)
        bad = [v for v in ids if not is_int_id(v)]
        if bad:
            raise MugeDataError(path, f"'{ids_field}' must hold integers only, got {bad[0]!r}", lineno)
        big = [v for v in ids if not fits_int64(v)]
        if big:
            raise MugeDataError(path, f"'{ids_field}' holds {big[0]}, which does not fit in a signed 64-bit integer",
                                lineno)
        item_ids = tuple(ids)
    elif require_ids:
        raise MugeDataError(path, f"missing field '{ids_field}' (ground-truth ids are required here)", lineno)
    return Query(qid, text, item_ids, lineno), schema


def iter_queries(path, require_ids: bool | None = None) -> Iterator[Query]:
    """Stream queries from a jsonl file. `require_ids`: True demands ground truth on every line."""
    path = os.fspath(path)
    seen: dict[int, int] = {}
    empty, no_truth, blank = True, [], []
    for lineno, raw in utf8_lines(path):
        if not raw.strip():  # a trailing newline or two, an empty line between: no query is lost
            blank.append(lineno)
            continue
        empty = False
        query, _ = parse_query_line(raw, path, lineno, require_ids)
        if query.query_id in seen:
            raise MugeDataError(
                path, f"duplicate query id {query.query_id} (first seen on line {seen[query.query_id]})", lineno)
        seen[query.query_id] = lineno
        if query.item_ids == ():
            no_truth.append(lineno)
        yield query
    if empty:
        raise MugeDataError(path, "empty file: no queries")
    if blank:
        log.warning("%s: skipped %s (line %s)", path, plural(len(blank), "blank line", "blank lines"), first_of(blank))
    if no_truth:
        log.warning("%s: %s with an empty ground-truth list (line %s): each is scored as a miss, as the reference "
                    "evaluator does", path, plural(len(no_truth), "query", "queries"), first_of(no_truth))


def utf8_lines(path: str, problems: list[str] | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, one line in memory at a time; a leading byte-order mark
    is dropped. A line that is not UTF-8 (a GBK export, say) raises an error naming the file and
    line or, given `problems`, is recorded there and skipped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                err = MugeDataError(path, f"not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                                          "MUGE files are UTF-8: convert it, e.g. iconv -f GBK -t UTF-8", lineno)
                if problems is None:
                    raise err from None
                problems.append(str(err))
                continue
            yield lineno, text


def starts_with_bom(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(UTF8_BOM)) == UTF8_BOM


def plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"



def read_queries(path, require_ids: bool | None = None) -> list[Query]:
    return list(iter_queries(path, require_ids))


def ground_truth_not_in_gallery(queries: Sequence[Query], contains) -> list[tuple[Query, int]]:
    """(query, id) for every ground-truth id that `contains(id)` says the gallery lacks: such an
    id can never be retrieved, so its query may be a miss however good the model."""
    return [(q, item) for q in queries for item in (q.item_ids or ()) if not contains(item)]


def write_queries(path, queries: Sequence[Query], schema: str = "tianchi", with_ids: bool = True) -> None:
    """Write queries as jsonl (used by the sample generator and tests)."""
    from infra.io import atomic_write_text, json_line

    id_field, text_field, ids_field = SCHEMAS[schema]
    lines = []
    for q in queries:
        obj = {id_field: q.query_id, text_field: q.text}
        if with_ids and q.item_ids is not None:
            obj[ids_field] = list(q.item_ids)
        lines.append(json_line(obj))
    atomic_write_text(path, "\n".join(lines) + "\n")
