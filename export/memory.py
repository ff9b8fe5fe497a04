"""Export within memory: what a stage frees is handed back to the system before the next."""
from __future__ import annotations


def free_memory() -> None:
    """Collect garbage and hand freed heap back to the system (glibc's `malloc_trim`): a tower's
    weights and graphs are freed in many blocks below glibc's mmap threshold, which would stay in
    the process, so the peak resident set would be the sum of the stages instead of the largest."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
