"""Bad competition input: the one error type (`infra.errors.MugeDataError`: it always says which
file and which line), and how every message checks ids and lists things."""
from __future__ import annotations

from infra.errors import MugeDataError

__all__ = ["MugeDataError", "fits_int64", "is_int_id", "first_of"]

INT64_MAX = 2**63 - 1


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
