"""One rule for every output path (`infra.outputs`): a command replaces only an earlier output of
its own kind, never what it reads, a directory holding that, or anything the project did not
write. Every output-writing command is run against the paths a mistyped `--out` can name, and the
whole tree is compared (every file's hash) before and after each refusal."""
import hashlib
import json
import os
import shutil
import subprocess

import pytest
from conftest import accepted, muge, refused
from tiny import tiny_config

from infra.outputs import MARKER
from train.config import save_config

FAST_EXPORT = ["--exporter", "torchscript", "--parity-queries", "20", "--parity-gallery", "30", "--parity-batch", "16"]


def tree(root) -> dict:
    """Every file under `root` (its sha256) and every directory (None): what a refusal must keep."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(runs, small_sample, tiny_bundle, tmp_path_factory):
    """A user's directory: two runs, the data, a bundle, a prediction, their own files, a
    read-only directory (a tmpfs mounted read-only as root, else a 0555 directory)."""
    root = tmp_path_factory.mktemp("world")
    for name, source in (("runs/x", runs["dual"]), ("runs/y", runs["dual"]), ("runs/clip", runs["chinese-clip"]),
                         ("data", small_sample), ("bundle", tiny_bundle)):
        shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("*.idx.npz"))
    (root / "user" / "photos").mkdir(parents=True)
    (root / "user" / "keep.txt").write_text("my notes\n")
    (root / "user" / "photos" / "a.jpg").write_bytes(b"\xff\xd8 a photo")
    (root / "notes.txt").write_text("not muge's\n")
    pred = [json.loads(line) for line in (root / "data" / "MR_valid_queries.jsonl").read_text().splitlines()]
    (root / "pred.jsonl").write_text("".join(json.dumps({"query_id": q["query_id"], "query_text": "",
                                                         "item_ids": list(range(1, 11))}) + "\n" for q in pred))
    save_config(tiny_config("dual", "train.epochs=1", "eval.untrained=false"), str(root / "tiny.yaml"))
    ro = root / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
        if done.returncode:
            ro = None
    else:
        os.chmod(ro, 0o555)
    yield root, ro
    if ro is not None and os.geteuid() == 0:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def command(kind: str, root, out) -> list:
    """The muge command line of `kind` writing `out`, reading the world's runs, data and files."""
    data = ["--data", root / "data"]
    return {
        "export": ["export", root / "runs" / "x", "--out", out, *data, *FAST_EXPORT],
        "export-hf": ["export", root / "runs" / "clip", "--format", "hf", "--out", out],
        "export-cnclip": ["export", root / "runs" / "clip", "--format", "cnclip", "--out", out],
        "average": ["average", root / "runs" / "x", root / "runs" / "y", "--out", out],
        "train": ["train", "--config", root / "tiny.yaml", *data, "--out", out],
        "predict": ["predict", "--bundle", root / "bundle", *data, "--split", "valid", "--out", out, "--workers", "0",
                    "--cache-dir", root.parent / "cache"],
        "report": ["report", "--queries", root / "data" / "MR_valid_queries.jsonl", "--images",
                   root / "data" / "MR_valid_imgs.tsv", "--pred", root / "pred.jsonl", "--out", out],
        "score": ["score", root / "data" / "MR_valid_queries.jsonl", root / "pred.jsonl", "--per-query", out],
        "sample": ["sample", out, "--train-queries", "20", "--eval-queries", "10", "--gallery-size", "20"],
    }[kind]


DIRECTORY_OUTPUTS = ("export", "export-hf", "average", "train", "sample")
FILE_OUTPUTS = ("export-cnclip", "predict", "report", "score")
# what each command reads (its source), relative to the world
SOURCES = {"export": "runs/x", "export-hf": "runs/clip", "export-cnclip": "runs/clip", "average": "runs/x",
           "train": "data", "predict": "bundle", "report": "pred.jsonl", "score": "data/MR_valid_queries.jsonl"}
READS, FOREIGN = "which this command reads", "holds files muge did not write"


def cases() -> dict:
    """(command, the path it is given, what the refusal says) for every command: its source, the
    source's parent, `.`, a folder of the user's, a file of the user's, a path under a read-only
    directory; and the cases particular to one command."""
    table = {}
    for kind in DIRECTORY_OUTPUTS + FILE_OUTPUTS:
        directory = kind in DIRECTORY_OUTPUTS
        if kind in SOURCES:
            table[kind, SOURCES[kind]] = READS
            table[kind, os.path.dirname(SOURCES[kind]) or "."] = READS
        table[kind, "."] = READS if kind in SOURCES else FOREIGN
        table[kind, "user"] = FOREIGN if directory else "is a directory; give the"
        table[kind, "notes.txt"] = "is a file, where the" if directory else "is a file muge did not write"
        table[kind, "ro/out"] = "cannot write"
    table["export", "data"] = READS  # the valid split the gate reads
    table["export", "data/sub"] = READS
    table["predict", "bundle/manifest.json"] = READS
    table["predict", "data/MR_valid_queries.jsonl"] = READS
    table["train", "runs/x"] = "holds a run (best.pt, last.pt)"  # an earlier run, without --resume
    table["average", "runs/clip"] = "is a run muge wrote, not a soup"
    return table


@pytest.mark.parametrize("kind, target", list(cases()), ids=[f"{k}:{t}" for k, t in cases()])
def test_a_mistyped_output_path_is_refused_and_nothing_changes(world, monkeypatch, kind, target):
    root, ro = world
    if target.startswith("ro/") and ro is None:
        pytest.skip("no read-only directory can be made here (neither a read-only tmpfs nor permission bits)")
    monkeypatch.chdir(root)
    out = target if target == "." else str(root / target)
    before = tree(root)
    result = refused(muge(*command(kind, root, out)), cases()[kind, target])
    assert (out if target != "." else " . ") in result.output, result.output
    assert tree(root) == before, kind


@pytest.mark.stage
@pytest.mark.parametrize("kind", [pytest.param("export", marks=pytest.mark.slow), "average", "report", "score"])
def test_overwrite_replaces_a_foreign_path_but_never_a_source(world, tmp_path, kind):
    root, _ = world
    directory = kind in DIRECTORY_OUTPUTS
    holding_source = root / (os.path.dirname(SOURCES[kind]) if directory else SOURCES[kind])
    before = tree(root)
    refused(muge(*command(kind, root, str(holding_source)), "--overwrite"), READS)
    assert tree(root) == before
    foreign = tmp_path / "mine"
    if directory:
        foreign.mkdir()
        (foreign / "keep.txt").write_text("x")
    else:
        foreign.write_text("x")
    refused(muge(*command(kind, root, str(foreign))), FOREIGN if directory else "is a file muge did not write",
            "add --overwrite to replace it")
    accepted(muge(*command(kind, root, str(foreign)), "--overwrite"))
    assert not (foreign / "keep.txt").exists() if directory else foreign.read_text() != "x"


@pytest.mark.stage
def test_rerunning_a_command_replaces_its_own_output(world, runs, tmp_path):
    """An earlier output of the command's own kind is replaced: the README's commands re-run."""
    root, _ = world
    for kind, out in (("export-hf", tmp_path / "hf"), ("average", tmp_path / "soup"), ("report", tmp_path / "r.html"),
                      ("score", tmp_path / "q.csv"), ("sample", tmp_path / "sample")):
        accepted(muge(*command(kind, root, str(out))))
        accepted(muge(*command(kind, root, str(out))))
    assert json.loads((tmp_path / "hf" / MARKER).read_text())["kind"] == "transformers directory"
    assert oct((tmp_path / "hf").stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    assert oct((tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    predicted = tmp_path / "valid.jsonl"
    for _ in range(2):
        accepted(muge(*command("predict", root, str(predicted))))
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == []  # no build left beside them


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.stage
def test_train_overwrite_replaces_only_the_runs_own_files(world, small_sample, tmp_path):
    root, _ = world
    run = tmp_path / "run"
    shutil.copytree(root / "runs" / "x", run)
    (run / "my-notes.txt").write_text("kept")
    accepted(muge("train", "--config", root / "tiny.yaml", "--data", small_sample, "--out", run, "--overwrite",
                  "--set", "data.limit_pairs=64"))
    assert (run / "my-notes.txt").read_text() == "kept" and (run / "best.pt").is_file()
    refused(muge("train", "--config", root / "tiny.yaml", "--data", small_sample, "--out", root / "user",
                 "--overwrite"), "holds files muge did not write")


def test_a_staged_output_replaces_its_own_only_when_complete_and_sweeps_killed_builds(tmp_path):
    """`infra.outputs.staged_dir`, which the bundle, the transformers directory and the soup share:
    built beside the destination, swapped in when complete with its marker and the umask's modes;
    a failure leaves the earlier output as it was; a build whose process is gone is removed, a
    live one's is kept."""
    import socket

    from infra.outputs import BUILDER, OutputKind, marker_kind, staged_dir

    kind = OutputKind("test output")
    for name, pid in ((".out.abcd1234", 2**22 + 12345), (".out.efgh5678", os.getpid())):  # killed, and live
        (tmp_path / name).mkdir()
        (tmp_path / name / BUILDER).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    with staged_dir(tmp_path / "out", kind) as build:
        assert os.path.dirname(build) == str(tmp_path) and not (tmp_path / "out").exists()
        (tmp_path / build / "a.txt").write_text("first")
    assert sorted(os.listdir(tmp_path)) == [".out.efgh5678", "out"] and marker_kind(str(tmp_path / "out")) == kind.name
    assert not (tmp_path / "out" / BUILDER).exists()
    assert oct((tmp_path / "out" / "a.txt").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    with pytest.raises(RuntimeError), staged_dir(tmp_path / "out", kind) as build:
        (tmp_path / build / "a.txt").write_text("second, never finished")
        raise RuntimeError("killed half way")
    assert (tmp_path / "out" / "a.txt").read_text() == "first"
    assert sorted(os.listdir(tmp_path)) == [".out.efgh5678", "out"]
