"""Readers for MUGE query files (jsonl) in the Tianchi and the Chinese-CLIP schemas.

Tianchi:      {"query_id": 8428, "query_text": "高级感托特包斜挎", "item_ids": [1076345, 517602]}
Chinese-CLIP: {"text_id": 8428, "text": "高级感托特包斜挎", "image_ids": [1076345, 517602]}
Test files carry no ids. Every problem is reported with the file and line it was found on.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

from .errors import MugeDataError, is_int_id

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


def _detect_schema(obj: dict) -> str | None:
    for name, (id_field, _, _) in SCHEMAS.items():
        if id_field in obj:
            return name
    return None


def parse_query_line(raw: str, path, lineno: int, require_ids: bool | None) -> tuple[Query, str]:
    """Parse one jsonl line into a Query and the schema it used."""
    if not raw.strip():
        raise MugeDataError(path, "blank line (every line must be one JSON object)", lineno)
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise MugeDataError(path, f"not valid JSON ({exc.msg} at column {exc.colno})", lineno) from None
    if not isinstance(obj, dict):
        raise MugeDataError(path, f"expected a JSON object, got {type(obj).__name__}", lineno)
    schema = _detect_schema(obj)
    if schema is None:
        raise MugeDataError(path, "missing field 'query_id' (or 'text_id' in the Chinese-CLIP schema)", lineno)
    id_field, text_field, ids_field = SCHEMAS[schema]
    qid = obj[id_field]
    if not is_int_id(qid):
        raise MugeDataError(path, f"'{id_field}' must be an integer, got {qid!r}", lineno)
    if text_field not in obj:
        raise MugeDataError(path, f"missing field '{text_field}'", lineno)
    text = obj[text_field]
    if not isinstance(text, str):
        raise MugeDataError(path, f"'{text_field}' must be a string, got {text!r}", lineno)
    item_ids = None
    if ids_field in obj:
        ids = obj[ids_field]
        if not isinstance(ids, list) or not ids:
            raise MugeDataError(path, f"'{ids_field}' must be a non-empty list of integers, got {ids!r}", lineno)
        bad = [v for v in ids if not is_int_id(v)]
        if bad:
            raise MugeDataError(path, f"'{ids_field}' must hold integers only, got {bad[0]!r}", lineno)
        item_ids = tuple(ids)
    elif require_ids:
        raise MugeDataError(path, f"missing field '{ids_field}' (ground-truth ids are required here)", lineno)
    return Query(qid, text, item_ids, lineno), schema


def iter_queries(path, require_ids: bool | None = None) -> Iterator[Query]:
    """Stream queries from a jsonl file. `require_ids`: True demands ground truth on every line."""
    path = os.fspath(path)
    seen: dict[int, int] = {}
    empty = True
    # utf-8-sig: accept (and drop) a UTF-8 byte-order mark.
    with open(path, encoding="utf-8-sig") as f:
        for lineno, raw in enumerate(f, start=1):
            empty = False
            query, _ = parse_query_line(raw, path, lineno, require_ids)
            if query.query_id in seen:
                raise MugeDataError(
                    path, f"duplicate query id {query.query_id} (first seen on line {seen[query.query_id]})", lineno)
            seen[query.query_id] = lineno
            yield query
    if empty:
        raise MugeDataError(path, "empty file: no queries")


def read_queries(path, require_ids: bool | None = None) -> list[Query]:
    return list(iter_queries(path, require_ids))


def check_ground_truth_in_gallery(queries: Sequence[Query], gallery_ids, queries_path, gallery_path) -> None:
    """Every ground-truth id must exist in the gallery; otherwise the split is inconsistent."""
    gallery = set(int(i) for i in gallery_ids)
    for q in queries:
        for item in q.item_ids or ():
            if item not in gallery:
                raise MugeDataError(
                    queries_path,
                    f"query {q.query_id}: ground-truth image {item} is not in the gallery {gallery_path}",
                    q.line)


def write_queries(path, queries: Sequence[Query], schema: str = "tianchi", with_ids: bool = True) -> None:
    """Write queries as jsonl (used by the sample generator and tests)."""
    from .io import atomic_write_text

    id_field, text_field, ids_field = SCHEMAS[schema]
    lines = []
    for q in queries:
        obj = {id_field: q.query_id, text_field: q.text}
        if with_ids and q.item_ids is not None:
            obj[ids_field] = list(q.item_ids)
        lines.append(json.dumps(obj, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")
