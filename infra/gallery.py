"""Gallery decoding in worker processes, straight into shared memory.

The main process creates a ring of batch slots, each one uint8 [batch, size, size, 3] buffer in
`multiprocessing.shared_memory`, and starts `workers` decode processes that attach to all of them.
A task names a slot and a range of TSV lines; the worker decodes each image of the range straight
into the slot's rows (`competition.images.decode_pixels`: MUGE's 224 x 224 JPEGs go from the
decoder into the buffer with no PIL image and no copy), zeroes the rows it left empty, and sends
back only the slot, the kept positions and the images it could not decode. So the pixels never
cross a pipe: the main process hands the slot's array to ONNX Runtime as it is, and a short
batch is already padded where it lies.

At most as many batches are in flight as there are slots (`2 x workers`, fewer when /dev/shm has
not room for them), so memory stays bounded whatever the gallery. Batches come back in TSV order.

Nothing is left in /dev/shm however predict ends (Ctrl-C, SIGTERM, SIGHUP, SIGKILL of the whole
process group, the OOM killer):
- each segment is named after the project, its owner and the creating process
  (`muge-<uid>-<pid>-<n>-<random>`), and unlinked as soon as every worker has attached to it
  (the mappings live on; the name is gone), a fraction of a second after the workers start;
- a ring that starts first removes the segments of any ring of this owner whose process is gone
  (one killed in that fraction of a second);
- tasks and results travel through one pipe per worker, not multiprocessing queues, whose
  semaphores are named files in /dev/shm under the spawn start method;
- a worker exits when its pipe to the main process closes.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import re
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import connection, resource_tracker, shared_memory
from typing import Protocol

import numpy as np

from .errors import MugeDataError
from .io import pid_alive, probe_directory

log = logging.getLogger(__name__)
SHM_DIR = "/dev/shm"
SHM_SHARE = 0.5  # of /dev/shm's free space, at most, for one ring (Docker's default /dev/shm is 64 MiB)
SHM_PREFIX = "muge-"
ATTACH_TIMEOUT_S = 120.0  # a worker's start (spawn, imports) before it has attached to every slot
_serial = itertools.count()


def segment_prefix(pid: int | None = None) -> str:
    """The names of the segments of process `pid` (default this one) begin with this."""
    return f"{SHM_PREFIX}{os.getuid()}-{os.getpid() if pid is None else pid}-"


def shared_memory_problem() -> str | None:
    """Why this process cannot create shared memory (a read-only or missing /dev/shm), or None when
    it can: a file of this owner's is made in /dev/shm and removed at once, as `shm_open` makes
    a segment there on Linux (and without `SharedMemory`, whose resource tracker would be one
    more process beside the run)."""
    try:
        probe_directory(SHM_DIR, f"{segment_prefix()}probe-")
    except OSError as exc:
        return f"{SHM_DIR}: {exc.strerror or exc}"
    return None


def sweep_orphans() -> list[str]:
    """Unlink this owner's segments whose creating process is gone; returns their names."""
    pattern = re.compile(rf"{re.escape(SHM_PREFIX)}{os.getuid()}-(\d+)-")
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if match and not pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
    if removed:
        log.info("removed %d shared-memory slots left in %s by a process that was killed", len(removed), SHM_DIR)
    return removed


def available_cores() -> int:
    """The cores this process may run on: `os.sched_getaffinity` sees a container's CPU set where
    `os.cpu_count()` sees the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 2


def default_workers() -> int:
    """Decode processes for this machine: every core this process may run on but one (for the
    main process and ONNX Runtime), at least one."""
    return max(1, available_cores() - 1)


class PipelineError(RuntimeError):
    """A decode worker died or failed outside the images' own errors."""


@dataclass
class Batch:
    index: int               # the task's number: batches come back in this order
    pixels: np.ndarray       # the slot, full capacity: rows [:count] decoded, the rest zeros
    count: int
    positions: np.ndarray    # TSV positions of the decoded rows
    bad: list                # (img_id, line, reason) of the images left out (--skip-bad-images)


def _attach(name: str) -> shared_memory.SharedMemory:
    """A segment the main process created, attached without registering it a second time with
    the resource tracker (which would unlink it when this worker exits; Python < 3.13 has no
    `track=False`). Its creator registered it and unlinks it."""
    register = resource_tracker.register
    resource_tracker.register = lambda *args, **kwargs: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


class Gallery(Protocol):
    """What the ring decodes from: a gallery file's image ids in file order, and each image resized
    into a given buffer (`competition.images.ImageTSV`), or a `MugeDataError` naming its line."""
    ids: np.ndarray

    def load_pixels(self, img_id: int, size: int, rule: str, out: np.ndarray) -> np.ndarray: ...


def decode_into(tsv: Gallery, start: int, end: int, out: np.ndarray, size: int, rule: str, skip_bad: bool):
    """Decode TSV positions [start, end) into the rows of `out`, kept images first; zero the
    rows left over. Returns (kept positions, bad list)."""
    kept, bad = [], []
    for pos in range(start, end):
        img_id = int(tsv.ids[pos])
        try:
            tsv.load_pixels(img_id, size, rule, out=out[len(kept)])
        except MugeDataError as err:
            if not skip_bad:
                raise
            bad.append((img_id, err.line or pos + 1, err.reason))
            continue
        kept.append(pos)
    out[len(kept):] = 0  # a short batch, padded in place: black images whose outputs are dropped
    return np.asarray(kept, np.int64), bad


@dataclass(frozen=True)
class DecodeJob:
    """What every decode worker is given: the gallery (its reader, a picklable callable such as the
    `ImageTSV` class, and its path), the slots and how to fill them."""

    reader: Callable[[str], Gallery]
    tsv_path: str
    slot_names: tuple[str, ...]
    shape: tuple[int, int, int, int]
    size: int
    rule: str
    skip_bad: bool


def _worker(job: DecodeJob, pipe) -> None:
    """A decode process: attaches to every slot and says so, then takes (task, slot, start, end)
    from its pipe and answers (task, slot, kept, bad, error) until the pipe closes or says None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C (and a closed terminal) are the main process's
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    segments = [_attach(name) for name in job.slot_names]
    slots = [np.ndarray(job.shape, np.uint8, buffer=s.buf) for s in segments]
    tsv = job.reader(job.tsv_path)
    try:
        pipe.send("attached")
        while True:
            try:
                task = pipe.recv()
            except (EOFError, OSError):  # the main process is gone (killed): so are we
                return
            if task is None:
                return
            index, slot, start, end = task
            try:
                kept, bad = decode_into(tsv, start, end, slots[slot], job.size, job.rule, job.skip_bad)
                err = None
            except MugeDataError as exc:
                kept, bad, err = None, None, exc
            except Exception as exc:  # anything else: its text, so that the main process can say it
                kept, bad, err = None, None, PipelineError(f"a decode worker failed: {type(exc).__name__}: {exc}")
            pipe.send((index, slot, kept, bad, err))
    finally:
        del slots
        for segment in segments:
            segment.close()


class DecodeRing:
    """`with DecodeRing(ImageTSV, path, ...) as ring: for batch in ring.batches(ranges): ...` (module
    docstring): `reader(tsv_path)` opens the gallery, in each worker. With `workers=0` the batches
    are decoded in this process into one local buffer."""

    def __init__(self, reader: Callable[[str], Gallery], tsv_path: str, size: int, rule: str, batch_size: int,
                 workers: int, skip_bad: bool = False):
        self.reader, self.tsv_path, self.size, self.rule, self.skip_bad = reader, tsv_path, size, rule, skip_bad
        self.shape = (batch_size, size, size, 3)
        self.workers = workers
        self.segments: list[shared_memory.SharedMemory] = []
        self.processes: list = []
        self.pipes: list = []

    # -- set-up and tear-down ---------------------------------------------------------------------
    def _slot_count(self) -> int:
        wanted = 2 * max(1, self.workers)
        slot_bytes = int(np.prod(self.shape))
        try:
            st = os.statvfs(SHM_DIR)
            room = int(st.f_bavail * st.f_frsize * SHM_SHARE) // slot_bytes
        except OSError:
            return wanted
        if room < 2:
            raise OSError(28, f"{SHM_DIR} has room for {room} batch of {slot_bytes / 2**20:.0f} MiB "
                              f"({self.shape[0]} images at {self.size} px) but the decode workers need 2: give the "
                              "machine (or container: docker run --shm-size=1g) more shared memory, or lower "
                              "--batch-size")
        if room < wanted:
            log.info("%s has room for %d batches in flight (of %d wanted): decoding with that many", SHM_DIR, room,
                     wanted)
        return min(wanted, room)

    def __enter__(self) -> DecodeRing:
        if self.workers == 0:
            self.local = np.zeros(self.shape, np.uint8)
            self.tsv = self.reader(self.tsv_path)
            return self
        try:
            sweep_orphans()
            slots = self._slot_count()
            nbytes = int(np.prod(self.shape))
            for _ in range(slots):
                name = f"{segment_prefix()}{next(_serial)}-{secrets.token_hex(4)}"
                self.segments.append(shared_memory.SharedMemory(name=name, create=True, size=nbytes))
            self.arrays = [np.ndarray(self.shape, np.uint8, buffer=s.buf) for s in self.segments]
            job = DecodeJob(self.reader, self.tsv_path, tuple(s.name for s in self.segments), self.shape, self.size,
                            self.rule, self.skip_bad)
            # spawn, not fork: a forked child can inherit a lock held by one of the parent's threads
            # (ONNX Runtime, tqdm, the import lock) and hang
            context = mp.get_context("spawn")
            for _ in range(self.workers):
                ours, theirs = context.Pipe(duplex=True)
                process = context.Process(target=_worker, daemon=True, args=(job, theirs))
                process.start()
                theirs.close()
                self.processes.append(process)
                self.pipes.append(ours)
            self._await_attached()
            self._unlink()  # every worker holds its mappings: the names can go now
        except BaseException:
            self.close()
            raise
        return self

    def _await_attached(self) -> None:
        waiting = set(range(self.workers))
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        while waiting:
            ready = connection.wait([self.pipes[w] for w in waiting], timeout=1.0)
            for pipe in ready:
                worker = self.pipes.index(pipe)
                try:
                    pipe.recv()
                except (EOFError, OSError):
                    raise PipelineError(f"a decode worker died while starting (exit code "
                                        f"{self.processes[worker].exitcode}); nothing was written") from None
                waiting.discard(worker)
            if waiting and time.monotonic() > deadline:
                raise PipelineError(f"{len(waiting)} decode workers did not start within {ATTACH_TIMEOUT_S:.0f}s")

    def _unlink(self) -> None:
        for segment in self.segments:
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers and release every slot (idempotent)."""
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.close()
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(timeout=10)
        self.processes, self.pipes = [], []
        self.arrays = []
        self._unlink()
        for segment in self.segments:
            with contextlib.suppress(Exception):
                segment.close()
        self.segments = []

    # -- the batches ------------------------------------------------------------------------------
    def batches(self, ranges: list[tuple[int, int]]) -> Iterator[Batch]:
        """Decode each (start, end) range of TSV positions; yield the batches in order. A batch's
        slot is reused once the caller asks for the next batch: use `pixels` before that."""
        if self.workers == 0:
            for index, (start, end) in enumerate(ranges):
                kept, bad = decode_into(self.tsv, start, end, self.local, self.size, self.rule, self.skip_bad)
                yield Batch(index, self.local, len(kept), kept, bad)
            return
        free = list(range(len(self.segments)))
        load = [0] * self.workers  # tasks in flight per worker
        owner: dict[int, int] = {}  # task -> worker
        submitted, ready = 0, {}
        for index in range(len(ranges)):
            while free and submitted < len(ranges):
                worker = load.index(min(load))
                self.pipes[worker].send((submitted, free.pop(), *ranges[submitted]))
                owner[submitted] = worker
                load[worker] += 1
                submitted += 1
            while index not in ready:
                done, slot, kept, bad, err = self._next_result()
                load[owner.pop(done)] -= 1
                if err is not None:
                    raise err
                ready[done] = (slot, kept, bad)
            slot, kept, bad = ready.pop(index)
            yield Batch(index, self.arrays[slot], len(kept), kept, bad)
            free.append(slot)

    def _next_result(self):
        while True:
            for pipe in connection.wait(self.pipes, timeout=1.0):
                try:
                    return pipe.recv()
                except (EOFError, OSError):
                    worker = self.pipes.index(pipe)
                    self.processes[worker].join(timeout=5)
                    raise PipelineError(f"a decode worker died (exit code {self.processes[worker].exitcode}); "
                                        "nothing was written") from None
            dead = [p for p in self.processes if not p.is_alive()]
            if dead:
                raise PipelineError(f"a decode worker died (exit code {dead[0].exitcode}); nothing was "
                                    "written") from None
