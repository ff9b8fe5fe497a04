"""A training run's `metrics.jsonl`, one typed record per epoch: `train` writes it, `muge report`
and the benches read it, all through this module (torch-free, like the readers of the task's
own files). An unreadable line is a `MugeDataError` naming the file and line."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from .errors import MugeDataError
from .io import atomic_write_text
from .records import RecordError, from_dict

HISTORY = "metrics.jsonl"


@dataclass
class EpochRecord:
    epoch: int                          # epochs completed (0: the untrained model, scored before any step)
    step: int                           # optimizer steps taken
    train_loss: float | None = None     # the epoch's mean loss (None before training)
    samples_per_s: float | None = None  # after the epoch's first batches (compile, start-up)
    r1: float | None = None             # valid scores, x100, on the epochs that are scored
    r5: float | None = None
    r10: float | None = None
    mean_recall: float | None = None
    mrr: float | None = None
    ema: dict | None = None             # the EMA weights' valid scores (`Score.as_dict`), with train.ema

    @property
    def scored(self) -> bool:
        return self.mean_recall is not None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None or k in ("train_loss", "samples_per_s")}


def record_from_dict(values: dict, where: str) -> EpochRecord:
    """An epoch record by the rule every record is read with (`infra.records`), its counts
    not negative; a refusal is a `MugeDataError` naming `where`."""
    try:
        record = from_dict(EpochRecord, values, what="epoch record")
    except RecordError as exc:
        raise MugeDataError(where, str(exc)) from None
    for key in ("epoch", "step"):
        if getattr(record, key) < 0:
            raise MugeDataError(where, f"{key}={getattr(record, key)}: expected a count (0 or more)")
    return record


def write_history(path: str, history: list[dict]) -> None:
    """`history` (the run's records, as the checkpoint keeps them: plain dicts) as metrics.jsonl."""
    records = [record_from_dict(h, f"{path} (epoch record {i})") for i, h in enumerate(history)]
    atomic_write_text(path, "".join(json.dumps(r.to_dict()) + "\n" for r in records))


def read_history(path: str) -> list[EpochRecord]:
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MugeDataError(path, f"not UTF-8 text (byte {exc.start + 1} of the line)", lineno) from None
            if not line.strip():
                continue
            try:
                values = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                raise MugeDataError(path, f"not valid JSON ({reason})", lineno) from None
            out.append(record_from_dict(values, f"{path}:{lineno}"))
    return out


def run_history(run_dir: str) -> list[EpochRecord]:
    """The records of the run in `run_dir` (FileNotFoundError when it has none)."""
    path = os.path.join(run_dir, HISTORY)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a training run directory")
    return read_history(path)
