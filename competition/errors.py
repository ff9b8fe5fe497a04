"""The one error type for bad competition input: it always says which file and which line."""
from __future__ import annotations

import os


class MugeDataError(ValueError):
    """Malformed MUGE input. The message names the file and line (or image id)."""

    def __init__(self, path: str | os.PathLike | None, message: str, line: int | None = None):
        self.path = str(path) if path is not None else None
        self.line = line
        self.reason = message
        where = self.path or "<input>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # picklable across worker processes (the default would call __init__(str))
        return (type(self), (self.path, self.reason, self.line))


def is_int_id(value) -> bool:
    """MUGE ids are JSON integers; bools are ints in Python but not ids."""
    return isinstance(value, int) and not isinstance(value, bool)
