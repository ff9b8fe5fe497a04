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


def _segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")} if os.path.isdir("/dev/shm") else set()


def _predict_until_decoding(tiny_bundle, big_split, tmp_path):
    """A `muge predict` subprocess, returned once its decode ring is in /dev/shm."""
    import time

    before = _segments()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(MUGE + ["predict", "--bundle", tiny_bundle, "--data", big_split, "--split", "test",
                                    "--out", str(tmp_path / "sub.jsonl"), "--cache-dir", str(tmp_path / "cache"),
                                    "--workers", "2", "--batch-size", "16"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not _segments() - before:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no decode ring appeared"
        time.sleep(0.05)
    return proc, before


def _workers_of(pid: int) -> list[int]:
    from bench.memory import children

    return children(pid)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="POSIX shared memory lives in /dev/shm on Linux")
@pytest.mark.parametrize("how", ["kill", "interrupt", "terminate"])
def test_a_predict_stopped_mid_gallery_leaves_no_shared_memory(tiny_bundle, big_split, tmp_path, how):
    """Killed (SIGKILL: the resource tracker unlinks the ring, the workers notice their parent is
    gone), interrupted (Ctrl-C: no traceback from any process) or terminated: no segment is left
    in /dev/shm, no worker lives on, no submission is written, and a rerun resumes right."""
    import signal
    import time

    proc, before = _predict_until_decoding(tiny_bundle, big_split, tmp_path)
    workers = _workers_of(proc.pid)
    proc.send_signal({"kill": signal.SIGKILL, "interrupt": signal.SIGINT, "terminate": signal.SIGTERM}[how])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    if how == "interrupt":
        assert "Aborted!" in err and "Traceback" not in err, err[-3000:]
    deadline = time.time() + 15
    while (_segments() - before or any(os.path.exists(f"/proc/{w}") for w in workers)) and time.time() < deadline:
        time.sleep(0.1)
    assert _segments() - before == set()
    assert not [w for w in workers if os.path.exists(f"/proc/{w}") and "zombie" not in open(f"/proc/{w}/status").read()
                .lower()]
    assert not (tmp_path / "sub.jsonl").exists()
    accepted(muge("predict", "--bundle", tiny_bundle, "--data", big_split, "--split", "test", "--out",
                  tmp_path / "sub.jsonl", "--cache-dir", tmp_path / "cache", "--workers", "2", "--batch-size", "16"))
    assert _segments() - before == set()
