"""The one error type for bad competition input: it always says which file and which line."""
from __future__ import annotations

import os


class MugeDataError(ValueError):
    """Malformed MUGE input. The message names the file and line (or image id)."""

    def __init__(self, path: str | os.PathLike | None, message: str | None = None, line: int | None = None):
        if message is None:  # rebuilt from one string: torch's DataLoader re-raises a worker's error so
            message = _unwrap_worker_error(str(path))  # (its text carries the worker's traceback)
            path = None
        self.path = str(path) if path is not None else None
        self.line = line
        self.reason = message
        where = self.path or ""
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {message}" if where else message)

    def __reduce__(self):  # picklable across worker processes (the default would call __init__(str))
        return (type(self), (self.path, self.reason, self.line))


INT64_MAX = 2**63 - 1


def _unwrap_worker_error(text: str) -> str:
    """The original message from a DataLoader worker's 'Caught MugeDataError ... Traceback ...' text."""
    for line in reversed(text.strip().splitlines()):
        if "MugeDataError: " in line:
            return line.split("MugeDataError: ", 1)[1]
    return text


def fits_int64(value: int) -> bool:
    """Ids in query and gallery files must fit numpy's int64 (the real ones are 5-7 digits)."""
    return -INT64_MAX - 1 <= value <= INT64_MAX


def is_int_id(value) -> bool:
    """MUGE ids are JSON integers; bools are ints in Python but not ids."""
    return isinstance(value, int) and not isinstance(value, bool)


def first_of(items, shown: int = 20, sep: str = ", ") -> str:
    """The first `shown` items joined by `sep`, then '... and N more': how every message lists things."""
    items = list(items)
    head = sep.join(str(x) for x in items[:shown])
    return head + (f"{sep}... and {len(items) - shown} more" if len(items) > shown else "")
