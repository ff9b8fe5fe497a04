"""Submission files: write them (Tianchi or Chinese-CLIP schema) and check them the way the
reference evaluator does. A submission that would be rejected is never written."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from infra.io import atomic_write_text, json_line
from infra.outputs import OutputKind, json_with_keys

from .errors import first_of, is_int_id
from .queries import SCHEMAS, Query, detect_schema, read_queries, starts_with_bom, utf8_lines

TOP_K = 10


class SubmissionError(ValueError):
    """The predictions would be rejected by the reference evaluator."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problem(s):\n  {first_of(self.problems, sep=chr(10) + '  ')}")


def _as_id(value):
    """Python ints stay; numpy integers become ints; everything else (bool, str, float) is kept
    as is so that validation can name it."""
    if isinstance(value, np.integer):
        return int(value)
    return value


def item_ids_problem(qid, ids, k: int = TOP_K) -> str | None:
    """The reference evaluator's per-line checks (stricter on bools, which are not ids)."""
    if not isinstance(ids, list):
        return f"query {qid}: item_ids must be a list, got {type(ids).__name__}"
    if len(ids) != k:
        return f"query {qid}: item_ids must hold exactly {k} ids, got {len(ids)}"
    for rank, v in enumerate(ids, start=1):
        if not is_int_id(v):
            return f"query {qid}: item id {v!r} at rank {rank} is not an integer"
    if len(set(ids)) != k:
        dupes = sorted({v for v in ids if ids.count(v) > 1})
        return f"query {qid}: duplicate item ids {dupes}"
    return None


def validate_predictions(preds: Mapping[int, Sequence], expected_ids: Iterable[int], k: int = TOP_K) -> list[str]:
    problems = []
    for qid, ids in preds.items():
        if not is_int_id(qid):
            problems.append(f"query id {qid!r} is not an integer")
            continue
        if isinstance(ids, (list, tuple, np.ndarray)):
            ids = [_as_id(v) for v in ids]
        problem = item_ids_problem(qid, ids, k)
        if problem:
            problems.append(problem)
    missing = [q for q in expected_ids if q not in preds]
    if missing:
        problems.append(f"{len(missing)} quer{'y has' if len(missing) == 1 else 'ies have'} no prediction: "
                        f"{first_of(missing)}")
    return problems


def write_submission(path, queries: Sequence[Query], preds: Mapping[int, Sequence[int]], schema: str = "tianchi",
                     k: int = TOP_K) -> str:
    """Validate, then atomically write one line per query (in the queries' order)."""
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; expected one of {sorted(SCHEMAS)}")
    clean = {_as_id(q): [_as_id(v) for v in ids] for q, ids in preds.items()}
    seen = set()
    dupes = [q.query_id for q in queries if q.query_id in seen or seen.add(q.query_id)]
    problems = [f"query {q} appears twice in the queries" for q in dupes]
    problems += validate_predictions({q.query_id: clean.get(q.query_id) for q in queries if q.query_id in clean},
                                     [q.query_id for q in queries], k)
    if problems:
        raise SubmissionError(problems)
    id_field, text_field, ids_field = SCHEMAS[schema]
    lines = [json_line({id_field: q.query_id, text_field: q.text, ids_field: clean[q.query_id]}) for q in queries]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return os.fspath(path)


def _is_submission(path: str) -> bool:
    """A submission by its first line: a query id and its predicted ids, in either schema."""
    return any(json_with_keys(path, id_field, ids_field, first_line=True)
               for id_field, _, ids_field in SCHEMAS.values())


SUBMISSION = OutputKind("submission", directory=False, recognise=_is_submission)


@dataclass
class SubmissionReport:
    path: str
    predictions: dict[int, list[int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def read_predictions(path, k: int = TOP_K, allow_bom: bool = False) -> SubmissionReport:
    """Parse a prediction file, collecting every problem (with its line) instead of stopping.
    Rejects what the reference evaluator rejects: a UTF-8 BOM (unless `allow_bom`, which warns),
    a file mixing the Tianchi and Chinese-CLIP schemas, a line that is not UTF-8 JSON."""
    path = os.fspath(path)
    report = SubmissionReport(path)
    if not os.path.isfile(path):
        report.errors.append(f"{path}: file not found")
        return report
    first_line: dict[int, int] = {}
    first_schema: tuple[str, int] | None = None
    if starts_with_bom(path):
        message = f"{path}:1: starts with a UTF-8 byte-order mark, which the reference evaluator rejects"
        if allow_bom:
            report.warnings.append(message + " (scored anyway; save the file without one before uploading)")
        else:
            report.errors.append(message + ": save the file without one")
    for lineno, raw in utf8_lines(path, report.errors):
        where = f"{path}:{lineno}"
        if not raw.strip():
            report.errors.append(f"{where}: blank line is not valid JSON")
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            report.errors.append(f"{where}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(obj, dict):
            report.errors.append(f"{where}: expected a JSON object")
            continue
        schema = detect_schema(obj)
        if schema is None:
            report.errors.append(f"{where}: missing 'query_id' (or 'text_id')")
            continue
        id_field, _, ids_field = SCHEMAS[schema]
        if first_schema is None:
            first_schema = (id_field, lineno)
        elif first_schema[0] != id_field:
            report.errors.append(f"{where}: a '{id_field}' line in a file of '{first_schema[0]}' lines (first on "
                                 f"line {first_schema[1]}); the reference evaluator rejects mixed schemas")
            continue
        qid = obj[id_field]
        if not is_int_id(qid):
            report.errors.append(f"{where}: {id_field} {qid!r} is not an integer")
            continue
        if ids_field not in obj:
            report.errors.append(f"{where}: query {qid} has no '{ids_field}'")
            continue
        problem = item_ids_problem(qid, obj[ids_field], k)
        if problem:
            report.errors.append(f"{where}: {problem}")
            continue
        if qid in first_line:
            report.warnings.append(f"{where}: query {qid} predicted again (first on line {first_line[qid]}); "
                                   "the evaluator keeps the last")
        first_line[qid] = lineno
        report.predictions[qid] = obj[ids_field]
    if not first_line and not report.errors:
        report.errors.append(f"{path}: empty file: no predictions")
    return report


def check_submission(queries_path, pred_path, k: int = TOP_K,
                     queries: Sequence[Query] | None = None, allow_bom: bool = False) -> SubmissionReport:
    """Every problem the reference evaluator would reject `pred_path` for, against `queries_path`
    (`queries`: its queries, when the caller has read them already)."""
    if queries is None:
        queries = read_queries(queries_path)
    report = read_predictions(pred_path, k, allow_bom)
    missing = [q.query_id for q in queries if q.query_id not in report.predictions]
    # a query whose line was malformed counts here too: its line's own error above says why
    if missing:
        report.errors.append(f"{len(missing)} of {len(queries)} queries have no valid prediction: {first_of(missing)}")
    expected = {q.query_id for q in queries}
    extra = [q for q in report.predictions if q not in expected]
    if extra:
        report.warnings.append(f"{len(extra)} predicted query id(s) are not in {queries_path} (ignored)")
    return report
