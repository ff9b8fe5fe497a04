"""The catalogue of bad inputs and faults, each run through the real `muge` entry point.

Every refusal: a non-zero exit, no traceback in the output, a message naming the file (and the
line or id where there is one), and nothing written that should not be. Where the reference
evaluator accepts an odd input, so do we (and say so).
"""
import json
import os
import re
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import not_an_image
from tiny import tiny_config

from muge_cli import cli
from train.config import save_config

FAST_EXPORT = ["--exporter", "torchscript", "--parity-queries", "40", "--parity-gallery", "60", "--parity-batch", "16"]
TEN = list(range(1, 11))


def muge(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def refused(result, *fragments):
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{result.output}"
    assert "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)
    return result


def accepted(result, *fragments):
    assert result.exit_code == 0, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)
    return result


@pytest.fixture
def data(small_sample, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(small_sample, d, ignore=shutil.ignore_patterns("*.idx.npz"))
    return d


def edit_lines(path, fn):
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(fn(lines)))


def predict(bundle, data, tmp_path, *extra, split="test"):
    return muge("predict", "--bundle", bundle, "--data", data, "--split", split, "--out", tmp_path / "sub.jsonl",
                "--cache-dir", tmp_path / "cache", "--workers", "0", *extra)


# -- security ----------------------------------------------------------------------------------
class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_in_a_checkpoint_is_refused_not_run(runs, small_sample, tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    shutil.copytree(runs["dual"], run)
    for name in ("best.pt", "last.pt"):
        torch.save({"model": {}, "arch": Evil(marker), "config": {}}, run / name)
    refused(muge("export", run, "--out", tmp_path / "bundle", "--data", small_sample),
            "best.pt: refused: it holds pickled objects", "no bundle written")
    refused(muge("export", run, "--checkpoint", run / "last.pt", "--out", tmp_path / "bundle", "--data", small_sample),
            "last.pt: refused")
    refused(muge("train", "--resume", run, "--data", small_sample), "last.pt: refused")
    assert not marker.exists() and not (tmp_path / "bundle").exists()


def test_no_code_path_unpickles_user_files():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    offenders = []
    for folder in ("competition", "train", "export", "predict", "report"):
        for name in os.listdir(os.path.join(root, folder)):
            if not name.endswith(".py"):
                continue
            text = open(os.path.join(root, folder, name), encoding="utf-8").read()
            for pattern in (r"weights_only\s*=\s*False", r"allow_pickle\s*=\s*True", r"pickle\.loads?\(",
                            r"torch\.load\((?![^)]*weights_only=True)"):
                offenders += [f"{folder}/{name}: {m.group()}" for m in re.finditer(pattern, text)]
    assert not offenders, offenders


# -- silent wrong answers ----------------------------------------------------------------------
def test_a_graph_from_elsewhere_is_refused_and_never_reuses_a_cache(tiny_bundle, small_sample, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    accepted(predict(bundle, small_sample, tmp_path, "--device", "cpu"))
    shutil.copy(bundle / "text.onnx", bundle / "image.onnx")  # another graph under the same name
    refused(predict(bundle, small_sample, tmp_path, "--device", "cpu"),
            "image.onnx: its sha256", "is not the manifest's")
    (bundle / "image.onnx").write_bytes(b"\0" * 100)  # and damaged, with the manifest "fixed" to match
    manifest = json.loads((bundle / "manifest.json").read_text())
    from competition.io import sha256

    manifest["files"]["image.onnx"] = sha256(bundle / "image.onnx")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    refused(predict(bundle, small_sample, tmp_path, "--device", "cpu"), "image.onnx: ONNX Runtime cannot load it")


@pytest.mark.parametrize("damage, message", [
    (lambda b: (b / "manifest.json").write_text("{not json"), "manifest.json: not valid JSON"),
    (lambda b: (b / "manifest.json").write_text(json.dumps({k: v for k, v in json.loads(
        (b / "manifest.json").read_text()).items() if k != "embed_dim"})), "manifest.json: no 'embed_dim'"),
    (lambda b: (b / "manifest.json").unlink(), "manifest.json not found"),
    (lambda b: shutil.rmtree(b / "tokenizer"), "tokenizer: no readable tokenizer.json"),
    (lambda b: (b / "text.onnx").unlink(), "text.onnx not found: the bundle is incomplete"),
], ids=["invalid-json", "missing-key", "no-manifest", "no-tokenizer", "no-graph"])
def test_a_damaged_bundle_is_named(tiny_bundle, small_sample, tmp_path, damage, message):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    damage(bundle)
    refused(predict(bundle, small_sample, tmp_path, "--device", "cpu"), message)
    assert not (tmp_path / "sub.jsonl").exists()


def test_skip_bad_images_is_part_of_the_cache_key(tiny_bundle, data, tmp_path):
    edit_lines(data / "MR_test_imgs.tsv", lambda ls: ls[:4] + [not_an_image(ls[4])] + ls[5:])
    accepted(predict(tiny_bundle, data, tmp_path, "--skip-bad-images"), '"skipped_images": 1')
    (tmp_path / "sub.jsonl").unlink()
    refused(predict(tiny_bundle, data, tmp_path), "MR_test_imgs.tsv:5: image", "bytes are not an image")
    assert not (tmp_path / "sub.jsonl").exists()


def test_valid_split_warns_of_truth_outside_the_gallery_and_of_unscored_files(tiny_bundle, data, tmp_path, caplog):
    queries = [json.loads(x) for x in (data / "MR_valid_queries.jsonl").read_text(encoding="utf-8").splitlines()]
    gone = queries[0]["item_ids"][0]
    edit_lines(data / "MR_valid_imgs.tsv", lambda ls: [x for x in ls if not x.startswith(b"%d\t" % gone)])
    accepted(predict(tiny_bundle, data, tmp_path, split="valid"), "MR ")
    assert "1 ground-truth id(s)" in caplog.text and f"{queries[0]['query_id']}:{gone}" in caplog.text
    del queries[1]["item_ids"]
    (data / "MR_valid_queries.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in queries),
                                                  encoding="utf-8")
    result = accepted(predict(tiny_bundle, data, tmp_path, split="valid"))
    assert "mean_recall" not in result.output and "1 of 40 queries have no item_ids (lines 2): the split is not " \
                                                  "scored" in caplog.text


def test_report_survives_hostile_text_and_file_names(tiny_bundle, data, tmp_path):
    queries = [json.loads(x) for x in (data / "MR_valid_queries.jsonl").read_text(encoding="utf-8").splitlines()]
    queries[0]["query_text"] = "<!--<script>红色</script>&amp; __TITLE__"
    (data / "MR_valid_queries.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in queries),
                                                  encoding="utf-8")
    pred = tmp_path / "__DATA__.jsonl"
    pred.write_text("".join(json.dumps({"query_id": q["query_id"], "item_ids": [2**70] + TEN[1:]}) + "\n"
                            for q in queries))  # an id beyond int64 too: valid JSON, matches nothing
    out = tmp_path / "r.html"
    accepted(muge("report", "--queries", data / "MR_valid_queries.jsonl", "--images", data / "MR_valid_imgs.tsv",
                  "--pred", pred, "--out", out, "--workers", "1"), "MR 0.00")
    html = out.read_text(encoding="utf-8")
    assert "<title>MUGE report: __DATA__.jsonl</title>" in html
    blob = re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S).group(1)
    assert "<" not in blob and json.loads(blob)["queries"][0]["text"] == queries[0]["query_text"]
    refused(muge("report", "--queries", data / "MR_valid_queries.jsonl", "--images", data / "MR_valid_imgs.tsv",
                 "--pred", pred, "--out", tmp_path / "r2.html", "--thumb-size", "0"), "--thumb-size")
    assert not (tmp_path / "r2.html").exists()


@pytest.mark.parametrize("line, message", [
    (b"1_2_3\tAAAA\n", "MR_test_imgs.tsv:3: image id b'1_2_3' is not a decimal integer"),
    (b"18446744073709551616\tAAAA\n", "MR_test_imgs.tsv:3: image id 18446744073709551616 does not fit"),
])
def test_tsv_ids_are_decimal_int64(tiny_bundle, data, tmp_path, line, message):
    edit_lines(data / "MR_test_imgs.tsv", lambda ls: ls[:2] + [line] + ls[3:])
    refused(predict(tiny_bundle, data, tmp_path), message)
    assert not (tmp_path / "sub.jsonl").exists()


def test_sample_refuses_sizes_it_cannot_draw(tmp_path):
    refused(muge("sample", tmp_path / "s", "--eval-queries", "0"), "--eval-queries")
    refused(muge("sample", tmp_path / "s", "--gallery-size", "3"), "--gallery-size")
    refused(muge("sample", tmp_path / "s", "--train-queries", "5000", "--gallery-size", "10"),
            "sample sizes out of range")
    assert not (tmp_path / "s").exists()


# -- agreement with the reference evaluator ----------------------------------------------------
def _gt(tmp_path, lines):
    path = tmp_path / "gt.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.mark.parametrize("pred_bytes, check_ok, score_ok, message", [
    (b'{"query_id": 1, "item_ids": [1180591620717411303424, 2, 3, 4, 5, 6, 7, 8, 9, 10]}\n', True, True, ""),
    (b'\xef\xbb\xbf{"query_id": 1, "item_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}\n', False, True, "byte-order mark"),
    (b'{"query_id": 1, "item_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}\n{"text_id": 2, "image_ids": [1, 2, 3, 4, 5, 6, '
     b'7, 8, 9, 10]}\n', False, False, "pred.jsonl:2: a 'text_id' line in a file of 'query_id' lines"),
    (b'{"query_id": 1, "item_ids": [true, 2, 3, 4, 5, 6, 7, 8, 9, 10]}\n', False, False, "item id True at rank 1"),
    ('{"query_id": 1, "query_text": "你", "item_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}\n'.encode("gbk"), False, False,
     "pred.jsonl:1: not UTF-8 text"),
], ids=["id-2**70", "bom", "mixed-schemas", "bool-id", "gbk"])
def test_check_submission_and_score_agree_with_the_evaluator(tmp_path, pred_bytes, check_ok, score_ok, message):
    gt = _gt(tmp_path, [{"query_id": 1, "query_text": "a", "item_ids": [3]}])
    pred = tmp_path / "pred.jsonl"
    pred.write_bytes(pred_bytes)
    check = muge("check-submission", gt, pred)
    (accepted if check_ok else refused)(check, message)
    result_path = tmp_path / "result.json"
    score = muge("score", gt, pred, "--out", result_path)
    (accepted if score_ok else refused)(score, message)
    result = json.loads(result_path.read_text())  # always written, as the evaluator does
    assert result["success"] is score_ok
    if score_ok:
        assert result["scoreJson"]["r1"] == 0.0 and result["scoreJson"]["r5"] == 100.0 * (pred_bytes.count(b" 3,") > 0)


def test_score_edges_of_the_ground_truth(tmp_path, caplog):
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps({"query_id": q, "item_ids": TEN}) + "\n" for q in (1, 2)))
    gt = _gt(tmp_path, [{"query_id": 1, "query_text": "a", "item_ids": [1]}, {"query_id": 2, "query_text": "b",
                                                                               "item_ids": []}])
    accepted(muge("score", gt, pred, "--out", tmp_path / "r.json"), "R@1 50.00")  # empty truth: a miss, as theirs
    assert "empty ground-truth list (line 2)" in caplog.text
    gt.write_text(json.dumps({"query_id": 2**64, "query_text": "a", "item_ids": [1]}) + "\n")
    refused(muge("score", gt, pred, "--out", tmp_path / "r.json"), "gt.jsonl:1: 'query_id' 18446744073709551616 "
                                                                   "does not fit")
    assert json.loads((tmp_path / "r.json").read_text())["success"] is False
    gt.write_bytes('{"query_id": 1, "query_text": "你", "item_ids": [1]}\n'.encode("gbk"))
    refused(muge("score", gt, pred, "--out", tmp_path / "r.json"), "gt.jsonl:1: not UTF-8 text")
    refused(muge("score", tmp_path / "absent.jsonl", pred, "--out", tmp_path / "r.json"), "absent.jsonl")
    assert json.loads((tmp_path / "r.json").read_text())["success"] is False


def test_query_files_name_the_line(tiny_bundle, data, tmp_path):
    path = data / "MR_test_queries.jsonl"
    edit_lines(path, lambda ls: ls[:3] + ['{"query_id": 5, "query_text": "你好"}\n'.encode("gbk")] + ls[4:])
    refused(predict(tiny_bundle, data, tmp_path), "MR_test_queries.jsonl:4: not UTF-8 text", "iconv")
    edit_lines(path, lambda ls: ls[:3] + [b'{"query_id": 99999999999999999999, "query_text": "x"}\n'] + ls[4:])
    refused(predict(tiny_bundle, data, tmp_path), "MR_test_queries.jsonl:4: 'query_id' 99999999999999999999 does not")
    assert not (tmp_path / "sub.jsonl").exists()


# -- caches ------------------------------------------------------------------------------------
def test_truncated_index_and_embedding_caches_are_rebuilt(tiny_bundle, data, tmp_path):
    accepted(predict(tiny_bundle, data, tmp_path))
    index = data / "MR_test_imgs.tsv.idx.npz"
    files = [index] + sorted((tmp_path / "cache").rglob("*.npz"))
    assert len(files) == 3  # the index, gallery.npz, queries.npz
    first = (tmp_path / "sub.jsonl").read_text()
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    accepted(predict(tiny_bundle, data, tmp_path))
    assert (tmp_path / "sub.jsonl").read_text() == first


# -- training ----------------------------------------------------------------------------------
@pytest.fixture
def preset(tmp_path):
    path = tmp_path / "tiny.yaml"
    save_config(tiny_config("dual", "train.epochs=1", "eval.untrained=false", "train.batch_size=16"), str(path))
    return path


def test_train_refuses_bad_inputs_before_work_and_leaves_no_run_dir(small_sample, data, preset, tmp_path):
    out = tmp_path / "run"
    refused(muge("train", "--config", preset, "--data", tmp_path / "nowhere", "--out", out),
            "nowhere/MR_train_queries.jsonl not found")
    refused(muge("train", "--config", preset, "--data", small_sample, "--out", out, "--set", "train.lr.head=fast"),
            "train.lr.head='fast': expected float")
    refused(muge("train", "--config", preset, "--data", small_sample, "--out", out, "--set", "data.workers=abc"),
            "data.workers='abc': expected int")
    refused(muge("train", "--resume", tmp_path, "--data", small_sample), "config.yaml not found")
    assert not out.exists()
    edit_lines(data / "MR_valid_imgs.tsv", lambda ls: ls[:6] + [not_an_image(ls[6])] + ls[7:])
    refused(muge("train", "--config", preset, "--data", data, "--out", out), "MR_valid_imgs.tsv:7: image",
            "bytes are not an image")
    assert not out.exists()  # found before the first epoch, and nothing left behind


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_bad_train_image_names_its_line_from_any_worker(data, preset, tmp_path, workers):
    edit_lines(data / "MR_train_imgs.tsv", lambda ls: [not_an_image(x) for x in ls])
    result = refused(muge("train", "--config", preset, "--data", data, "--out", tmp_path / "run",
                          "--set", f"data.workers={workers}"), "MR_train_imgs.tsv:", "bytes are not an image")
    assert "DataLoader" not in result.output and not (tmp_path / "run").exists()


def test_resume_and_export_name_a_missing_or_truncated_checkpoint(runs, small_sample, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["dual"], run)
    (run / "last.pt").unlink()
    refused(muge("train", "--resume", run, "--data", small_sample), "last.pt: checkpoint not found")
    (run / "best.pt").write_bytes((run / "best.pt").read_bytes()[:5000])
    refused(muge("export", run, "--out", tmp_path / "b", "--data", small_sample, *FAST_EXPORT),
            "best.pt: not a readable checkpoint, truncated or corrupt")
    assert not (tmp_path / "b").exists()


# -- faults ------------------------------------------------------------------------------------
def test_export_removes_build_dirs_of_killed_exports(runs, small_sample, tmp_path):
    stale = tmp_path / ".bundle.abcd1234"  # what a SIGKILLed export leaves: its pid is gone
    stale.mkdir()
    (stale / ".builder.json").write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename}))
    (stale / "text.onnx").write_bytes(b"half")
    live = tmp_path / ".bundle.efgh5678"  # one that is still being built by a live process: kept
    live.mkdir()
    (live / ".builder.json").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    accepted(muge("export", runs["dual"], "--out", tmp_path / "bundle", "--data", small_sample, *FAST_EXPORT))
    assert sorted(os.listdir(tmp_path)) == [".bundle.efgh5678", "bundle"]
    assert not (tmp_path / "bundle" / ".builder.json").exists()

