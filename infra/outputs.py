"""Where a command may write, and how a directory output is put in place: one rule for every
output path, checked before any work.

- An output replaces only an earlier output of its own kind: a directory holding this project's
  marker (`MARKER`) for that kind, or a file whose content shows it is one (`OutputKind.recognise`).
- It never replaces or deletes what the command reads (its sources), anything inside one, or a
  directory that holds one: not even with `--overwrite`.
- Anything else already at the path (a non-empty directory or a file the project did not write,
  a file where a directory goes) is refused, naming the path and what it holds, unless the
  command's `--overwrite` says to replace it.

`staged_dir` builds a directory output beside its destination, marked with the process building
it, and swaps it in only when it is complete (the path checked again first); a failure removes
the build, and a build left by a killed process is swept by the next build of the same output.
What it writes gets the modes the umask gives, as any file a user creates.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .io import WriteError, pid_alive, probe_directory

MARKER = ".muge-output.json"  # in every directory output: {"kind": ...}, what it is
BUILDER = ".builder.json"     # in a build directory only: which process is building it
STALE_BUILD_S = 24 * 3600     # a build this old is swept even if its process still runs


class OutputError(ValueError):
    """An output path refused before any work: names the path and what it holds; nothing changed."""


@dataclass(frozen=True)
class OutputKind:
    """One kind of output a command writes."""
    name: str                                       # in words, for messages: "bundle", "submission"
    directory: bool = True                          # a directory (with MARKER) or a single file
    recognise: Callable[[str], bool] | None = None  # an earlier output of this kind by its content: a file's,
                                                    # or a directory written before the marker existed


def marker_kind(directory: str) -> str | None:
    """The kind named by `directory`'s marker, or None."""
    try:
        with open(os.path.join(directory, MARKER), encoding="utf-8") as f:
            kind = json.load(f).get("kind")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return kind if isinstance(kind, str) else None


def write_marker(directory: str, kind: OutputKind) -> None:
    with open(os.path.join(directory, MARKER), "w", encoding="utf-8") as f:
        json.dump({"kind": kind.name, "written_by": "muge-retrieval"}, f)
    os.chmod(os.path.join(directory, MARKER), _mode(0o666))


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def source_conflict(path: str, sources: Iterable[str | None]) -> str | None:
    """How writing `path` would touch one of `sources` (paths on disk; others are skipped), or None."""
    out = os.path.realpath(path)
    for source in sources:
        if not source or not os.path.exists(source):
            continue
        src = os.path.realpath(source)
        if out == src:
            return f"is {source} itself, which this command reads"
        if _within(out, src):
            return f"is inside {source}, which this command reads"
        if _within(src, out):
            return f"holds {source}, which this command reads"
    return None


def _listing(directory: str, entries: list[str], shown: int = 4) -> str:
    names = sorted(entries)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_output(path, kind: OutputKind, sources: Iterable[str | None] = (), overwrite: bool | None = None,
                 flag: str = "--out") -> None:
    """Refuse `path` as where a `kind` output goes (an OutputError naming it and what it holds)
    unless it is new, an empty directory, or an earlier output of this kind; `overwrite` (the
    command's --overwrite; None where it has none) lets it replace anything else but a source,
    what is inside one or what holds one. Also refused: a path where no file can be created."""
    path = os.fspath(path)
    conflict = source_conflict(path, sources)
    if conflict:
        raise OutputError(f"{flag} {path} {conflict}: writing the {kind.name} there would replace it; nothing was "
                          f"changed; choose another {flag}")
    hint = f"choose another {flag}" + (", or add --overwrite to replace it" if overwrite is False else "")
    if os.path.isdir(path) and not kind.directory:
        raise OutputError(f"{flag} {path} is a directory; give the {kind.name}'s file name")
    if os.path.lexists(path) and not overwrite:
        _check_existing(path, kind, hint, flag)
    _check_creatable(path, flag)


def _check_existing(path: str, kind: OutputKind, hint: str, flag: str) -> None:
    if not kind.directory:
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        if not (empty or os.path.isfile(path) and kind.recognise and kind.recognise(path)):
            raise OutputError(f"{flag} {path} is a file muge did not write as a {kind.name}: nothing was changed; "
                              f"{hint}")
        return
    if not os.path.isdir(path):
        raise OutputError(f"{flag} {path} is a file, where the {kind.name} (a directory) goes: nothing was changed; "
                          f"{hint}")
    entries = os.listdir(path)
    if not entries:
        return
    found = marker_kind(path)
    if found == kind.name or found is None and kind.recognise and kind.recognise(path):
        return
    if found:
        raise OutputError(f"{flag} {path} is a {found} muge wrote, not a {kind.name}: nothing was changed; {hint}")
    raise OutputError(f"{flag} {path} holds files muge did not write as a {kind.name} ({_listing(path, entries)}): "
                      f"nothing was changed; {hint}")


def _check_creatable(path: str, flag: str) -> None:
    """A file can be created beside `path` (in its nearest existing ancestor, where its missing
    parents would be made): probed by creating one, as root sees through permission bits."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    try:
        if not os.path.isdir(parent):
            raise NotADirectoryError(20, f"{parent} is a file")
        probe_directory(parent, ".muge-write-check-")
    except OSError as exc:
        raise WriteError(exc.errno, f"cannot write {path} ({flag}): {exc.strerror or exc}; nothing was "
                                    "changed") from None


def _mode(full: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return full & ~umask


def _apply_umask(directory: str) -> None:
    """Give everything under `directory` the modes the umask gives (tempfile's are 0700 / 0600)."""
    os.chmod(directory, _mode(0o777))
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), _mode(0o777))
        for name in files:
            os.chmod(os.path.join(root, name), _mode(0o666))


def replace_path(src: str, dst: str) -> None:
    """Put the finished directory `src` at `dst`; what was at `dst` is removed only afterwards."""
    old = None
    if os.path.lexists(dst):
        old = dst + f".old-{os.getpid()}"
        os.replace(dst, old)
    os.replace(src, dst)
    if old and os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    elif old:
        os.remove(old)


def sweep_builds(parent: str, prefix: str) -> None:
    """Remove build directories named `prefix...` that a killed process left (its pid gone from
    this host), or older than a day."""
    import logging

    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if not name.startswith(prefix) or not os.path.isdir(path) or not os.path.isfile(os.path.join(path, BUILDER)):
            continue
        try:
            with open(os.path.join(path, BUILDER), encoding="utf-8") as f:
                owner = json.load(f)
            alive = owner.get("host") == socket.gethostname() and pid_alive(int(owner["pid"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            alive = False
        if not alive or time.time() - os.path.getmtime(path) > STALE_BUILD_S:
            logging.getLogger(__name__).info("removing %s, left by a build that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(path, kind: OutputKind, sources: Iterable[str | None] = (), overwrite: bool | None = None):
    """Yield a new build directory beside `path` for a `kind` output; on success it gets its
    marker and the umask's modes and replaces `path` (checked by `check_output` before and again
    now), on failure it is removed. Builds of `path` left by killed processes are swept first."""
    path, sources = os.fspath(path), list(sources)
    check_output(path, kind, sources, overwrite)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    prefix = "." + os.path.basename(os.path.abspath(path))[:80] + "."
    sweep_builds(parent, prefix)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        with open(os.path.join(tmp, BUILDER), "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
        yield tmp
        os.remove(os.path.join(tmp, BUILDER))
        write_marker(tmp, kind)
        _apply_umask(tmp)
        check_output(path, kind, sources, overwrite)  # nothing else took the path meanwhile
        replace_path(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_head(path: str, limit: int = 1 << 16) -> str:
    """Up to `limit` bytes of the start of a file as text ('' when unreadable): what a file
    recogniser looks at, never the whole of a 10 GB file."""
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def json_with_keys(path: str, *keys: str, first_line: bool = False, limit: int = 1 << 24) -> bool:
    """Whether the file (or its first line) is a JSON object holding every one of `keys`."""
    text = read_head(path, limit)
    if first_line:
        text = text.lstrip("\ufeff").split("\n", 1)[0]
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and all(k in value for k in keys)
