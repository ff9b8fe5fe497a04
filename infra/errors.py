"""The one error type for a bad input file, shared by every stage: it says which file and which line.
Defined here, below every stage (the task's readers in `competition` raise it, and so do the
machinery's own readers: a run's history, a gallery's decode workers)."""
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


def _unwrap_worker_error(text: str) -> str:
    """The original message from a DataLoader worker's 'Caught MugeDataError ... Traceback ...' text."""
    for line in reversed(text.strip().splitlines()):
        if "MugeDataError: " in line:
            return line.split("MugeDataError: ", 1)[1]
    return text
