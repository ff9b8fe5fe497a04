"""Faults a machine throws at predict: two processes sharing one cache, and a full disk."""
import os
import subprocess
import sys
import uuid

import pytest
from conftest import accepted, muge, refused

MUGE = [sys.executable, "-c", "from muge_cli import main; main()"]


@pytest.fixture(scope="module")
def big_split(small_sample, tmp_path_factory):
    """The sample's test images repeated to 1,200 lines under new ids: a gallery that takes a
    second or two, so that two processes overlap on it."""
    from bench.gpu import write_repeated_split

    return write_repeated_split(str(small_sample), str(tmp_path_factory.mktemp("big")), 1200, 200)


@pytest.mark.slow
def test_two_predicts_share_one_cache_dir(tiny_bundle, big_split, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    runs = [subprocess.Popen(MUGE + ["predict", "--bundle", tiny_bundle, "--data", big_split, "--split", "test",
                                     "--out", str(tmp_path / f"sub{i}.jsonl"), "--cache-dir", str(tmp_path / "cache"),
                                     "--workers", "1", "--batch-size", "32"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    logs = [run.communicate(timeout=300) for run in runs]
    for run, (_, err) in zip(runs, logs):
        assert run.returncode == 0, err[-3000:]
    assert (tmp_path / "sub0.jsonl").read_bytes() == (tmp_path / "sub1.jsonl").read_bytes()
    embedded = sum(err.count("embedded 1200 images") for _, err in logs)
    assert embedded == 1, [err[-1500:] for _, err in logs]  # one embeds, the other waits and reuses its work
    leftovers = [n for _, _, files in os.walk(tmp_path / "cache") for n in files if n.startswith(("chunk-", "."))
                 and n != ".lock"]
    assert leftovers == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 100 KiB tmpfs, where the machine lets this process mount one (root with CAP_SYS_ADMIN)."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}): the disk-full test "
                    "needs root with CAP_SYS_ADMIN")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.stage
def test_a_full_disk_gets_a_clear_error_and_a_rerun_with_room_is_right(tiny_bundle, big_split, tmp_path, tiny_disk):
    """The cache (1,200 x 32 float32 = 150 KiB of embeddings) does not fit in 100 KiB: a clear error
    naming the file, nothing half-written left; a rerun with room gives the single-run answer."""
    args = ["predict", "--bundle", tiny_bundle, "--data", big_split, "--split", "test", "--workers", "0"]
    refused(muge(*args, "--cache-dir", tiny_disk / "cache", "--out", tmp_path / "sub.jsonl"),
            "No space left on device", str(tiny_disk / "cache"))
    assert not (tmp_path / "sub.jsonl").exists()
    left = [n for _, _, files in os.walk(tiny_disk) for n in files if n.endswith(".tmp")]
    assert left == []
    accepted(muge(*args, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "sub.jsonl"))
    accepted(muge(*args, "--cache-dir", tmp_path / "fresh", "--out", tmp_path / "again.jsonl"))
    assert (tmp_path / "sub.jsonl").read_bytes() == (tmp_path / "again.jsonl").read_bytes()
    # the submission itself on a full disk: refused, naming it; nothing partial
    (tiny_disk / "filler").write_bytes(b"\0" * (96 << 10))
    refused(muge(*args, "--cache-dir", tmp_path / "cache", "--out", tiny_disk / "sub.jsonl"),
            f"cannot write {tiny_disk / 'sub.jsonl'}", "No space left on device")
    assert sorted(os.listdir(tiny_disk)) == ["cache", "filler"]


def _ours(pid: int) -> set[str]:
    """This predict's segments in /dev/shm (named after their process: `infra.gallery`)."""
    from infra.gallery import SHM_DIR, segment_prefix

    return {n for n in os.listdir(SHM_DIR) if n.startswith(segment_prefix(pid))}


def _shm_mapped(pids) -> set[int]:
    """The inodes of every /dev/shm file the processes map: slots, and named semaphores (which
    glibc maps under a temporary name before linking it to `sem.NAME`, so only the inode tells).
    What must be gone from /dev/shm once the processes are."""
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8") as f:
                found |= {int(line.split()[4]) for line in f if "/dev/shm/" in line}
        except OSError:
            pass
    return found


def _shm_inodes() -> set[int]:
    return {os.stat(os.path.join("/dev/shm", n), follow_symlinks=False).st_ino for n in os.listdir("/dev/shm")}


def _predict_until_decoding(tiny_bundle, big_split, tmp_path, ignored: dict | None = None):
    """A `muge predict` subprocess (in a process group of its own, SIGINT and SIGHUP at their
    defaults unless `ignored` maps them to SIG_IGN), returned once both its decode workers have
    mapped the ring; with what they map in /dev/shm."""
    import signal
    import time

    from infra.gallery import segment_prefix

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    # the signals' dispositions of a terminal's foreground job, whatever this test runs under: a
    # script's background job (`make test &`) ignores SIGINT, and so would the predict it starts
    dispositions = {signal.SIGINT: signal.SIG_DFL, signal.SIGHUP: signal.SIG_DFL, **(ignored or {})}
    proc = subprocess.Popen(MUGE + ["predict", "--bundle", tiny_bundle, "--data", big_split, "--split", "test",
                                    "--out", str(tmp_path / "sub.jsonl"), "--cache-dir", str(tmp_path / "cache"),
                                    "--workers", "2", "--batch-size", "16"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: [signal.signal(n, d) for n, d in dispositions.items()])
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no decode ring appeared"
        children = _workers_of(proc.pid)  # the decode workers, and the resource tracker
        workers = [w for w in children if _maps_ring(w, segment_prefix(proc.pid))]
        if len(workers) >= 2 and not _ours(proc.pid):  # attached, and the names already unlinked
            return proc, children, _shm_mapped([proc.pid, *children])
        time.sleep(0.05)


def _maps_ring(pid: int, prefix: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8") as f:
            return prefix in f.read()
    except OSError:
        return False


def _workers_of(pid: int) -> list[int]:
    from bench.memory import children

    return children(pid)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory lives in /dev/shm on Linux")
@pytest.mark.parametrize("how", ["kill", "kill-group", "hangup-group", "interrupt", "terminate"])
def test_a_predict_stopped_mid_gallery_leaves_no_shared_memory(tiny_bundle, big_split, tmp_path, how):
    """Killed (SIGKILL of the main process, or of its whole group with the resource tracker, as
    `timeout -s KILL`, docker and systemd do), hung up (SIGHUP to the group: a closed terminal),
    interrupted (Ctrl-C: no traceback from any process) or terminated: nothing it mapped in
    /dev/shm (slots, semaphores) is left, no worker lives on, no submission is written, and a
    rerun resumes right. Only this predict's files are counted: others may run beside it."""
    import signal
    import time

    proc, workers, mapped = _predict_until_decoding(tiny_bundle, big_split, tmp_path)
    assert mapped
    number = {"kill": signal.SIGKILL, "kill-group": signal.SIGKILL, "hangup-group": signal.SIGHUP,
              "interrupt": signal.SIGINT, "terminate": signal.SIGTERM}[how]
    if how.endswith("-group"):
        os.killpg(proc.pid, number)
    else:
        proc.send_signal(number)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, err[-3000:]
    assert not list((tmp_path / "cache").rglob("gallery.npz")), "signalled after the gallery was done: proves nothing"
    if how == "interrupt":
        assert "Aborted!" in err and "Traceback" not in err, err[-3000:]
    deadline = time.time() + 15
    while (mapped & _shm_inodes() or any(os.path.exists(f"/proc/{w}") for w in workers)) and time.time() < deadline:
        time.sleep(0.1)
    assert mapped & _shm_inodes() == set()
    assert not [w for w in workers if os.path.exists(f"/proc/{w}") and "zombie" not in open(f"/proc/{w}/status").read()
                .lower()]
    assert not (tmp_path / "sub.jsonl").exists()
    accepted(muge("predict", "--bundle", tiny_bundle, "--data", big_split, "--split", "test", "--out",
                  tmp_path / "sub.jsonl", "--cache-dir", tmp_path / "cache", "--workers", "2", "--batch-size", "16"))
    assert not _ours(os.getpid())


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory lives in /dev/shm on Linux")
def test_a_predict_started_with_hangup_ignored_outlives_its_terminal(tiny_bundle, big_split, tmp_path):
    """`nohup muge predict ... &`: SIGHUP (the terminal closing) mid-gallery does not stop it; it
    writes its submission as if nothing happened."""
    import signal

    proc, _, _ = _predict_until_decoding(tiny_bundle, big_split, tmp_path, {signal.SIGHUP: signal.SIG_IGN})
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    accepted(muge("check-submission", os.path.join(big_split, "MR_test_queries.jsonl"), tmp_path / "sub.jsonl"))


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory lives in /dev/shm on Linux")
def test_segments_of_a_killed_predict_are_swept_and_others_kept():
    """A ring killed before its workers attached leaves its named segments: the next ring of this
    owner removes those whose process is gone, and no one else's."""
    from multiprocessing import shared_memory

    from infra.gallery import segment_prefix, sweep_orphans

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    orphan = shared_memory.SharedMemory(name=f"{segment_prefix(dead_pid)}0-test", create=True, size=4096)
    alive = shared_memory.SharedMemory(name=f"{segment_prefix()}0-test", create=True, size=4096)
    try:
        assert orphan.name in sweep_orphans()
        assert not os.path.exists(f"/dev/shm/{orphan.name}") and os.path.exists(f"/dev/shm/{alive.name}")
    finally:
        from multiprocessing import resource_tracker

        for segment in (orphan, alive):
            segment.close()
            try:
                segment.unlink()
            except FileNotFoundError:  # swept: the tracker need not unlink it at exit
                resource_tracker.unregister(segment._name, "shared_memory")


def test_training_evaluation_decodes_in_process_when_shared_memory_is_short(small_sample, monkeypatch, caplog):
    """Docker's default /dev/shm (64 MiB) holds less than two slots of 256 images at 224 px: the
    decode ring refuses, and training-time evaluation then decodes in its own process."""
    import logging

    import torch

    from infra.gallery import DecodeRing
    from train.evaluate import EvalSettings, check_gallery

    def short(self):
        raise OSError(28, "/dev/shm has room for 1 batch but the decode workers need 2")

    monkeypatch.setattr(DecodeRing, "_slot_count", short)
    caplog.set_level(logging.INFO, logger="train.evaluate")
    check_gallery(str(small_sample / "MR_valid_imgs.tsv"), EvalSettings(32, "squash", 64, 1, torch.device("cpu")))
    assert "decoding the gallery in this process instead" in caplog.text
    assert "checked the 120 images" in caplog.text


def test_training_on_a_read_only_dev_shm_loads_in_process(small_sample, tmp_path, monkeypatch, caplog):
    """/dev/shm read-only (a locked-down container): the loader's workers could hand no batch over,
    so training warns and loads in its own process, as evaluation decodes in its own; the run
    completes. Read-only is simulated: creating any shared-memory segment fails with EROFS."""
    import errno
    import logging
    import tempfile
    from multiprocessing import shared_memory

    from tiny import tiny_config

    from infra.gallery import SHM_DIR, shared_memory_problem
    from train.main import train_run

    real, real_mkstemp = shared_memory.SharedMemory, tempfile.mkstemp

    def read_only(name=None, create=False, size=0, **kwargs):
        if create:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(name, create, size, **kwargs)

    def read_only_mkstemp(*args, dir=None, **kwargs):
        if dir == SHM_DIR:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkstemp(*args, dir=dir, **kwargs)

    assert shared_memory_problem() is None
    monkeypatch.setattr(shared_memory, "SharedMemory", read_only)
    monkeypatch.setattr(tempfile, "mkstemp", read_only_mkstemp)
    assert shared_memory_problem() == "/dev/shm: Read-only file system"
    caplog.set_level(logging.INFO)
    train_run(tiny_config("dual", "train.epochs=1", "data.workers=2", "data.limit_pairs=64", "eval.untrained=false"),
              str(small_sample), str(tmp_path / "run"))
    assert "data.workers=2: the loader's workers hand batches over in shared memory, which cannot be created here " \
           "(/dev/shm: Read-only file system): loading in this process instead" in caplog.text
    assert "decoding the gallery in this process instead" in caplog.text
    assert (tmp_path / "run" / "last.pt").exists()


def test_a_read_only_cache_is_read_and_predict_embeds_what_it_lacks(tiny_bundle, small_sample, tmp_path, monkeypatch,
                                                                     caplog):
    """A cache directory that cannot be written (a read-only mount, another user's) still serves
    the embeddings it holds; what it lacks is embedded without being saved, with a warning. Read-only
    is simulated (tests run as root, whom permission bits do not stop)."""
    import errno
    import logging

    args = ["predict", "--bundle", tiny_bundle, "--data", small_sample, "--split", "valid", "--cache-dir",
            tmp_path / "cache", "--workers", "0"]
    accepted(muge(*args, "--out", tmp_path / "a.jsonl"))
    real_open, real_makedirs = os.open, os.makedirs

    def read_only(path, *a, **k):
        if str(path).startswith(str(tmp_path / "cache")) and (len(a) < 1 or a[0] & (os.O_CREAT | os.O_WRONLY |
                                                                                     os.O_RDWR)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr(os, "makedirs", lambda path, *a, **k: read_only(path, os.O_CREAT) if str(path).startswith(
        str(tmp_path / "cache")) and not os.path.isdir(path) else real_makedirs(path, *a, **k))
    accepted(muge(*args, "--out", tmp_path / "b.jsonl"))
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    caplog.set_level(logging.WARNING, logger="predict.embed")
    accepted(muge(*args[:-4], "--cache-dir", tmp_path / "cache" / "other", "--workers", "0", "--out",
                  tmp_path / "c.jsonl"))
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "c.jsonl").read_text()
    assert "cannot be written (Read-only file system): embedding without saving" in caplog.text
    assert not (tmp_path / "cache" / "other").exists()
