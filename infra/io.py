"""Atomic file writes: a reader never sees a half-written submission, index or checkpoint.
A write that fails (a full disk, a read-only directory, a path that is a directory) leaves
nothing behind and raises `WriteError`, which names the file the caller asked for."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile


class WriteError(OSError):
    """A result file could not be written; nothing was left half-written. Names the file."""


@contextlib.contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temporary path in the destination's directory; rename it onto `path` on success."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(21, "it is a directory")
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path)[:80] + ".", suffix=suffix + ".tmp",
                                   dir=directory)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a result file gets the usual mode
        yield tmp
        os.replace(tmp, path)
    except WriteError:
        _remove(tmp)
        raise
    except OSError as exc:
        _remove(tmp)
        raise WriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}; nothing was written") from None
    except BaseException:
        _remove(tmp)
        raise


def probe_directory(directory: str, prefix: str) -> None:
    """Create a file named `prefix...` in `directory` and remove it at once: raises the OSError of
    a directory that takes no new file (read-only, missing, full), whoever is asking."""
    fd, probe = tempfile.mkstemp(prefix=prefix, dir=directory)
    os.close(fd)
    os.unlink(probe)


def _remove(tmp: str | None) -> None:
    if tmp:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


# Characters that are legal raw inside a JSON string but split lines for `str.splitlines()` and
# line-based readers, and lone surrogates, which no UTF-8 file can hold: written as \\uXXXX escapes.
_UNSAFE_IN_LINES = re.compile("[\u2028\u2029\u0085\u000b\u000c\u001c-\u001e\ud800-\udfff]")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exit_on_hangup_or_term() -> None:
    """SIGTERM (docker stop, systemd, `timeout`) and SIGHUP (a closed terminal or ssh session)
    unwind like Ctrl-C, so `finally` blocks remove temporary files, build directories and
    shared memory (SIGKILL cannot be caught: each stage sweeps what a killed run leaves).
    A signal this process was started with ignored stays ignored: `nohup muge predict ... &`
    outlives its terminal, as nohup promises (and a script's background job ignores SIGINT:
    Python itself leaves it so)."""
    import signal
    import sys

    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, lambda number, frame: sys.exit(128 + number))


def json_line(obj) -> str:
    """One JSON object on one line, non-ASCII text kept readable, whatever the strings hold."""
    return _UNSAFE_IN_LINES.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(obj, ensure_ascii=False))


def content_fingerprint(path, samples: int = 16, block: int = 4096) -> str:
    """Size, mtime and a sample of the content (the first and last 64 KiB and `samples` blocks
    between), at the cost of a few reads. A file edited in place that keeps its size and mtime is
    told apart when the edit touches a sampled span; an edit elsewhere is not (a full hash of a
    10 GB gallery on every predict would cost more than it saves)."""
    st = os.stat(path)
    h = hashlib.blake2b(f"{st.st_size}|{st.st_mtime_ns}".encode(), digest_size=16)
    edge = 65536
    spans = [(0, edge), (max(0, st.st_size - edge), edge)]
    spans += [(st.st_size * i // (samples + 1), block) for i in range(1, samples + 1)]
    with open(path, "rb") as f:
        for offset, length in spans:
            f.seek(offset)
            h.update(f.read(length))
    return h.hexdigest()


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
