"""The catalogue of bad inputs and faults, each run through the real `muge` entry point.

Every refusal: a non-zero exit, no traceback in the output, a message naming the file (and the
line or id where there is one), and nothing written that should not be. Where the reference
evaluator accepts an odd input, so do we (and say so).
"""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import accepted, muge, not_an_image, refused
from tiny import tiny_config

from train.config import save_config

FAST_EXPORT = ["--exporter", "torchscript", "--parity-queries", "40", "--parity-gallery", "60", "--parity-batch", "16"]
TEN = list(range(1, 11))




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
    from infra.io import sha256

    manifest["files"]["image.onnx"] = sha256(bundle / "image.onnx")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    refused(predict(bundle, small_sample, tmp_path, "--device", "cpu"), "image.onnx: ONNX Runtime cannot load it")


def _edit_manifest(bundle, **values):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(values)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, message", [
    (lambda b: (b / "manifest.json").write_text("{not json"), "manifest.json: not valid JSON"),
    (lambda b: (b / "manifest.json").write_text(json.dumps({k: v for k, v in json.loads(
        (b / "manifest.json").read_text()).items() if k != "embed_dim"})),
     "manifest.json: no embed_dim: every manifest has one"),
    (lambda b: (b / "manifest.json").unlink(), "manifest.json not found"),
    (lambda b: _edit_manifest(b, format="muge-bundle/0"),
     "manifest.json: format 'muge-bundle/0', but this muge reads 'muge-bundle/2' bundles"),
    (lambda b: _edit_manifest(b, format=None), "manifest.json: format None, but this muge reads"),
    (lambda b: _edit_manifest(b, image_size="224"), "manifest.json: image_size='224': expected int"),
    (lambda b: shutil.rmtree(b / "tokenizer"), "tokenizer: no readable tokenizer.json"),
    (lambda b: (b / "text.onnx").unlink(), "text.onnx not found: the bundle is incomplete"),
    (lambda b: _edit_manifest(b, files=5), "manifest.json: files=5: expected a mapping of str to str"),
    (lambda b: _edit_manifest(b, external_data=None), "manifest.json: external_data=None: expected a mapping"),
    (lambda b: _edit_manifest(b, external_data="text.onnx.data"), "manifest.json: external_data='text.onnx.data': "
                                                                   "expected a mapping"),
    (lambda b: _edit_manifest(b, external_data={"text.onnx": "text.onnx.data"}),
     "manifest.json: external_data.text.onnx='text.onnx.data': expected a list of str"),
    (lambda b: _edit_manifest(b, external_data={"text.onnx": ["../../etc/passwd"]}),
     "manifest.json: external_data.text.onnx: '../../etc/passwd' is not a file name inside the bundle"),
    (lambda b: _edit_manifest(b, external_data={"text.onnx": ["/etc/passwd"]}), "'/etc/passwd' is not a file name"),
    (lambda b: _edit_manifest(b, files={"../text.onnx": "0" * 64}), "files: '../text.onnx' is not a file name"),
    (lambda b: _edit_manifest(b, max_text_length=0), "manifest.json: max_text_length=0: expected 1 to 4096"),
    (lambda b: _edit_manifest(b, max_text_length=-5), "manifest.json: max_text_length=-5: expected 1 to 4096"),
    (lambda b: _edit_manifest(b, max_text_length=10**9), "max_text_length=1000000000: expected 1 to 4096"),
    (lambda b: _edit_manifest(b, max_text_length=100),  # the tiny text tower has 64 positions
     "manifest.json: max_text_length=100, but text.onnx cannot take 100 tokens"),
    (lambda b: _edit_manifest(b, resize_rule="bogus"),
     "manifest.json: resize_rule='bogus': expected one of squash, shorter-crop"),
    (lambda b: _edit_manifest(b, inverse_temperature=float("nan")),
     "manifest.json: inverse_temperature=nan: expected a positive finite number"),
    (lambda b: _edit_manifest(b, inverse_temperature=-1),
     "manifest.json: inverse_temperature=-1.0: expected a positive finite"),
    (lambda b: _edit_manifest(b, novelty=1), "manifest.json: unknown manifest key novelty"),
    (lambda b: (b / "manifest.json").write_text('{"format": "muge-bundle/2", "parity": ' + "[" * 200_000 +
                                                "]" * 200_000 + "}"), "manifest.json: nested too deeply"),
], ids=["invalid-json", "missing-key", "no-manifest", "other-version", "no-version", "mistyped", "no-tokenizer",
        "no-graph", "files-int", "external-null", "external-string", "external-list-string", "external-parent",
        "external-absolute", "files-parent", "text-length-0", "text-length-negative", "text-length-huge",
        "text-length-over-positions", "resize-rule", "multiplier-nan", "multiplier-negative", "unknown-key",
        "deep"])
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
@pytest.mark.slow
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



# -- round 3: pretrained weights and tokenizers ---------------------------------------------------------
def _pretrained_export(weights, data, out, *extra):
    return muge("export", "--pretrained", weights, "--out", out, "--data", data, "--parity-queries", "40",
                "--parity-gallery", "60", *extra)


def _nothing_staged(tmp_path):
    assert not [n for n in os.listdir(tmp_path) if n.startswith((".pretrained-", ".b."))], os.listdir(tmp_path)


@pytest.mark.stage
def test_weights_that_do_not_fill_chinese_clip_are_refused(small_sample, tmp_path):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(str(bert))
    refused(_pretrained_export(bert, small_sample, tmp_path / "b"), f"{bert}: these weights do not fit a Chinese-CLIP",
            "missing (", "unexpected (", "no bundle written")
    assert not (tmp_path / "b").exists()
    _nothing_staged(tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:2000]),
     "cannot load Chinese-CLIP weights"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\0" * 64), "cannot load Chinese-CLIP weights"),
    (lambda d: ((d / "model.safetensors").unlink(), torch.save({"x": Evil(str(d / "pwned"))},
                                                               str(d / "pytorch_model.bin"))),
     "cannot load Chinese-CLIP weights"),
    (lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace('"hidden_size": 32',
                                                                                       '"hidden_size": 48')),
     "cannot load Chinese-CLIP weights"),
], ids=["truncated", "not-safetensors", "pickled-code", "config-shapes"])
def test_damaged_pretrained_weights_get_one_clear_error(small_sample, tmp_path, damage, message):
    from conftest import tiny_chinese_clip_dir

    weights = tiny_chinese_clip_dir(tmp_path / "w", small_sample)
    damage(weights)
    refused(_pretrained_export(weights, small_sample, tmp_path / "b"), str(weights), message, "no bundle written")
    assert not (tmp_path / "b").exists() and not (weights / "pwned").exists()
    _nothing_staged(tmp_path)
    refused(_pretrained_export(weights / "config.json", small_sample, tmp_path / "b"),
            "config.json: not a Chinese-CLIP checkpoint file")


def test_a_tokenizer_that_does_not_fit_the_text_tower_is_refused(small_sample, tmp_path):
    from conftest import tiny_chinese_clip_dir

    from model.tokenizer import SPECIALS

    few = tiny_chinese_clip_dir(tmp_path / "few", small_sample, vocab=SPECIALS, vocab_rows=500)
    refused(_pretrained_export(few, small_sample, tmp_path / "b"), "of the tokens of 40 queries are [UNK]",
            "no bundle written")
    from competition.queries import iter_queries
    from model.tokenizer import build_char_vocab

    vocab = build_char_vocab(q.text for q in iter_queries(small_sample / "MR_train_queries.jsonl"))
    big = tiny_chinese_clip_dir(tmp_path / "big", small_sample,  # a vocabulary beyond the embedding's rows
                                vocab=vocab + [f"tok{i}" for i in range(600)], vocab_rows=400)
    refused(_pretrained_export(big, small_sample, tmp_path / "b"), "emits ids up to", "embedding has 400 rows")
    assert not (tmp_path / "b").exists()


def test_a_tokenizer_given_as_a_file_is_refused_not_swapped_for_cn_clips(small_sample, tmp_path):
    """Only the weights' own file (no --tokenizer) means cn_clip's vocabulary; a file given as the
    tokenizer is the user's, and one that is no tokenizer is named."""
    from conftest import tiny_chinese_clip_dir

    weights = tiny_chinese_clip_dir(tmp_path / "w", small_sample)
    refused(_pretrained_export(weights, small_sample, tmp_path / "b", "--tokenizer", weights / "vocab.txt"),
            f"{weights / 'vocab.txt'}: cannot load a tokenizer", "no bundle written")
    assert not (tmp_path / "b").exists()


# -- round 3: configs and runs ---------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("train=0", "train is a section"), ("train.lr=null", "train.lr is a section"),
    ("data.augment=false", "data.augment is a section"), ("train.data_seed=-1", "train.data_seed=-1"),
])
def test_a_section_takes_only_a_mapping_and_seeds_are_not_negative(small_sample, preset, tmp_path, override, message):
    refused(muge("train", "--config", preset, "--data", small_sample, "--out", tmp_path / "run", "--set", override),
            message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, message", [("- a\n- b\n", "not a list"), ("7\n", "not a int"),
                                           ("", "an empty preset")])
def test_a_preset_that_is_not_a_mapping_is_named(small_sample, tmp_path, text, message):
    (tmp_path / "p.yaml").write_text(text)
    refused(muge("train", "--config", tmp_path / "p.yaml", "--data", small_sample, "--out", tmp_path / "run",
                 "--set", "train.epochs=1"), "p.yaml: ", message)


def test_resume_refuses_a_config_edited_to_another_model(runs, small_sample, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(runs["dual"], run)
    before = (run / "last.pt").read_bytes()
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("head: mlp", "head: linear"))
    refused(muge("train", "--resume", run, "--data", small_sample, "--set", "train.epochs=2"),
            "last.pt: its weights do not fit the model", "config.yaml's model section was edited since (head differ)")
    assert (run / "last.pt").read_bytes() == before


def test_average_refuses_an_out_that_is_an_input_and_partial_runs(runs, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(runs["dual"], a)
    shutil.copytree(runs["dual"], b)
    before = (a / "best.pt").read_bytes()
    refused(muge("average", a, b, "--out", a), f"--out {a} is {a} itself, which this command reads", "nothing written")
    refused(muge("average", a, b, "--out", str(b) + "/"), "itself, which this command reads")
    assert (a / "best.pt").read_bytes() == before
    refused(muge("average", a, b, "--out", runs["chinese-clip"]), "is a run muge wrote, not a soup")
    (b / "config.yaml").unlink()
    refused(muge("average", a, b, "--out", tmp_path / "soup"), "config.yaml", "nothing written")
    assert not (tmp_path / "soup").exists()
    (b / "config.yaml").write_text("- a list\n")
    refused(muge("average", a, b, "--out", tmp_path / "soup"), "b/config.yaml: a preset is a mapping")
    shutil.copy(a / "config.yaml", b / "config.yaml")
    ckpt = torch.load(a / "best.pt", weights_only=True)
    torch.save({**ckpt, "model": [1, 2]}, b / "best.pt")
    refused(muge("average", a, b, "--out", tmp_path / "soup"),
            "b/best.pt: not a muge checkpoint: its 'model' is a list")
    assert not (tmp_path / "soup").exists() and sorted(os.listdir(tmp_path)) == ["a", "b"]


# -- round 3: predict's flags -------------------------------------------------------------------------------
def test_huge_ensemble_weights_are_normalised_safely(tiny_bundle, small_sample, tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    shutil.copytree(tiny_bundle, a)
    shutil.copytree(tiny_bundle, b)
    args = ["predict", "--bundle", a, "--bundle", b, "--data", small_sample, "--split", "valid", "--workers", "0",
            "--cache-dir", tmp_path / "cache"]
    accepted(muge(*args, "--weights", "1,1", "--out", tmp_path / "even.jsonl"))
    accepted(muge(*args, "--weights", "1e308,1e308", "--out", tmp_path / "huge.jsonl"))
    assert (tmp_path / "huge.jsonl").read_bytes() == (tmp_path / "even.jsonl").read_bytes()
    for weights, message in (("1e309,1", "expected 2 finite non-negative numbers"),
                             ("1,2,3", "expected 2 finite non-negative numbers"), ("0,0", "not all 0")):
        refused(muge(*args, "--weights", weights, "--out", tmp_path / "x.jsonl", "--cache-dir", tmp_path / "c2"),
                message)
    seven = [x for i in range(7) for x in ("--bundle", a if i % 2 else b)]
    refused(muge("predict", *seven, "--data", small_sample, "--weights", "auto", "--cache-dir", tmp_path / "c2",
                 "--out", tmp_path / "x.jsonl"), "up to 6 bundles, not 7")
    assert not (tmp_path / "c2").exists() and not (tmp_path / "x.jsonl").exists()  # refused before any work


@pytest.mark.parametrize("extra, message", [
    (["--rerank", "dual-softmax", "--rerank-beta", "1e6"], "--rerank-beta 1000000.0: expected a number in (0, 300]"),
    (["--rerank", "qbnorm", "--rerank-beta", "nan"], "--rerank-beta nan: expected a number"),
    (["--rerank", "qbnorm", "--rerank-beta", "inf"], "--rerank-beta inf: expected a number"),
    (["--rerank-beta", "5"], "--rerank-beta applies to --rerank, which is not given"),
    (["--bank", "SELF"], "--bank applies to --rerank"),
    (["--rerank", "dual-softmax", "--bank", "SELF"], "is the file of the queries being answered"),
])
def test_reranking_flags_are_checked_before_any_work(tiny_bundle, small_sample, tmp_path, extra, message):
    extra = [str(small_sample / "MR_valid_queries.jsonl") if x == "SELF" else x for x in extra]
    refused(muge("predict", "--bundle", tiny_bundle, "--data", small_sample, "--split", "valid", "--out",
                 tmp_path / "x.jsonl", "--cache-dir", tmp_path / "cache", "--workers", "0", *extra), message)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "x.jsonl").exists()


def test_answered_queries_are_left_out_of_the_bank(tiny_bundle, small_sample, tmp_path, caplog):
    bank = tmp_path / "bank.jsonl"
    lines = (small_sample / "MR_train_queries.jsonl").read_text(encoding="utf-8").splitlines()
    valid = (small_sample / "MR_valid_queries.jsonl").read_text(encoding="utf-8").splitlines()
    bank.write_text("\n".join(lines[:100] + valid[:5]) + "\n", encoding="utf-8")
    result = accepted(muge("predict", "--bundle", tiny_bundle, "--data", small_sample, "--split", "valid", "--out",
                           tmp_path / "x.jsonl", "--cache-dir", tmp_path / "cache", "--workers", "0", "--rerank",
                           "dual-softmax", "--bank", bank))
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["rerank"]["bank_queries"] == 100 and summary["rerank"]["bank_left_out"] == 5
    assert "left 5 queries out of the bank" in caplog.text


def test_a_large_beta_keeps_the_reranked_order_exact():
    """At the largest β allowed, float64 rescoring ranks like a dense float64 computation."""
    import numpy as np
    from tiny import rerank_topk

    from predict.rerank import MAX_BETA, bank_stats

    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    q, g, bank = (unit(rng.standard_normal((n, 16))) for n in (30, 400, 300))
    stats = bank_stats(bank, g, MAX_BETA)
    for method in ("dual-softmax", "qbnorm"):
        _, pos = rerank_topk(method, q, g, stats, MAX_BETA, k=10)
        s = q.astype(np.float64) @ g.T.astype(np.float64)
        log_z = np.logaddexp.reduce(MAX_BETA * (bank.astype(np.float64) @ g.T.astype(np.float64)), axis=0)
        if method == "dual-softmax":
            dense = s / (1 + np.exp(log_z - MAX_BETA * s))
        else:
            dense = np.where(stats.active[np.argmax(s, axis=1)][:, None], MAX_BETA * s - log_z, s)
        assert len({tuple(r) for r in np.round(np.take_along_axis(dense, pos, 1), 12)}) == len(q)  # no collapsed ties
        assert (pos == np.argsort(-dense, axis=1, kind="stable")[:, :10]).mean() > 0.99


def test_output_paths_are_checked_first_and_named(tiny_bundle, small_sample, tmp_path):
    args = ["predict", "--bundle", tiny_bundle, "--data", small_sample, "--split", "valid", "--workers", "0"]
    (tmp_path / "afile").write_text("x")
    refused(muge(*args, "--cache-dir", tmp_path / "afile", "--out", tmp_path / "s.jsonl"),
            f"--cache-dir {tmp_path / 'afile'} is a file")
    refused(muge(*args, "--cache-dir", tmp_path / "c", "--out", tmp_path), f"--out {tmp_path} is a directory")
    refused(muge(*args, "--cache-dir", tmp_path / "c", "--out", tmp_path / "afile" / "s.jsonl"),
            f"cannot write {tmp_path / 'afile' / 's.jsonl'}")
    assert not (tmp_path / "c").exists()


def test_a_long_ensemble_gets_a_default_name_the_file_system_takes(tiny_bundle, small_sample, tmp_path, monkeypatch):
    bundles = []
    for i in range(3):
        bundles.append(tmp_path / (f"{i}-" + "a-very-long-bundle-name" * 4))
        shutil.copytree(tiny_bundle, bundles[-1])
    monkeypatch.chdir(tmp_path)
    accepted(muge("predict", *[x for b in bundles for x in ("--bundle", b)], "--data", small_sample, "--split",
                  "valid", "--workers", "0", "--cache-dir", tmp_path / "cache"))
    (written,) = [n for n in os.listdir(tmp_path / "submissions") if n.endswith("-valid.jsonl")]
    assert written.startswith("0-a-very-long") and "+2-more-" in written and len(written) < 255


def test_a_manifest_that_lies_about_the_image_size_is_refused(tiny_bundle, small_sample, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "image_size": 48}))
    refused(muge("predict", "--bundle", tiny_bundle, "--bundle", bundle, "--data", small_sample, "--out",
                 tmp_path / "s.jsonl", "--cache-dir", tmp_path / "cache", "--workers", "0"),
            "manifest.json says image_size 48, but image.onnx takes 32x32 images")


def test_odd_query_files_still_make_a_valid_submission(tiny_bundle, data, tmp_path, caplog):
    """Blank lines are skipped and counted; a lone surrogate and line separators survive to the
    submission's query_text, escaped, one line per query."""
    from competition import check_submission

    path = data / "MR_test_queries.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    lines[0] = json.dumps({**first, "query_text": first["query_text"] + "\ud800\u2028"})
    path.write_text("\n".join(lines) + "\n\n\n", encoding="utf-8")
    accepted(predict(tiny_bundle, data, tmp_path))
    assert "skipped 2 blank lines" in caplog.text
    out = (tmp_path / "sub.jsonl").read_text(encoding="utf-8")
    assert len(out.splitlines()) == len(lines) and check_submission(path, tmp_path / "sub.jsonl").ok
    assert json.loads(out.splitlines()[0])["query_text"] == first["query_text"] + "\ud800\u2028"


def test_a_tsv_edited_in_place_keeping_size_and_mtime_is_embedded_again(tiny_bundle, data, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="predict.embed")
    accepted(predict(tiny_bundle, data, tmp_path, split="valid"))
    tsv = data / "MR_valid_imgs.tsv"
    st = os.stat(tsv)
    lines = tsv.read_bytes().splitlines(keepends=True)  # two images swap ids: same bytes, same length
    head = [line.split(b"\t", 1) for line in lines[:2]]
    lines[:2] = [head[1][0] + b"\t" + head[0][1], head[0][0] + b"\t" + head[1][1]]
    tsv.write_bytes(b"".join(lines))
    os.utime(tsv, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(tsv).st_size == st.st_size and os.stat(tsv).st_mtime_ns == st.st_mtime_ns
    caplog.clear()
    accepted(predict(tiny_bundle, data, tmp_path, split="valid"))
    assert "gallery embeddings reused" not in caplog.text
    galleries = sorted((os.path.join(root, "gallery.npz") for root, _, files in os.walk(tmp_path / "cache")
                        if "gallery.npz" in files), key=os.path.getmtime)
    assert len(galleries) == 2  # the edited file has a key of its own
    (old_ids, old_feats), (new_ids, new_feats) = [(z["ids"], z["features"]) for z in map(np.load, galleries)]
    # the new embeddings are of the edited file: the two images kept their rows and traded ids
    assert new_ids[:2].tolist() == old_ids[:2][::-1].tolist() and (new_ids[2:] == old_ids[2:]).all()
    np.testing.assert_allclose(new_feats, old_feats, atol=1e-6)


def test_the_fingerprint_sees_in_place_edits_in_its_sampled_spans_only(tmp_path):
    from infra.io import content_fingerprint

    path = tmp_path / "g.tsv"
    size = 4 << 20  # 4 MiB: 64 KiB at each end, 16 blocks of 4 KiB between
    path.write_bytes(bytes(size))
    st = os.stat(path)
    before = content_fingerprint(path)

    def edit(offset: int) -> str:
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(b"\x01")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        return content_fingerprint(path)

    sampled = edit(size * 5 // 17 + 100)  # inside the fifth sampled block
    assert sampled != before
    path.write_bytes(bytes(size))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert content_fingerprint(path) == before
    assert edit(size * 5 // 17 + 8192) == before  # between two sampled blocks: the documented blind spot


@pytest.mark.stage
def test_resume_says_when_config_yaml_drops_the_ema(small_sample, preset, tmp_path, caplog):
    run = tmp_path / "run"
    accepted(muge("train", "--config", preset, "--data", small_sample, "--out", run, "--set", "train.ema=0.9",
                  "--set", "data.limit_pairs=32"))
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("ema: 0.9", "ema: null"))
    accepted(muge("train", "--resume", run, "--data", small_sample, "--set", "train.epochs=2"))
    assert "holds an EMA of the weights, but config.yaml no longer sets train.ema" in caplog.text


# -- round 4 -------------------------------------------------------------------------------------------------
def test_a_per_query_csv_opens_safely_in_a_spreadsheet(tmp_path):
    """Formula-like texts neutralised (OWASP), a lone CR quoted (one row per query), a lone
    surrogate escaped instead of crashing the writer, and a BOM for Excel's UTF-8."""
    import pandas as pd

    texts = ["=HYPERLINK(\"x\")", "+1", "-50%折扣", "@SUM(A1)", "\tq", "红\r裙", "坏\ud800字", "普通 连衣裙", "\0=1+1",
             "裙\r", "\r", "行\u2028分"]
    gt = tmp_path / "gt.jsonl"
    gt.write_text("".join(json.dumps({"query_id": i + 1, "query_text": t, "item_ids": [100 + i]}) + "\n"
                          for i, t in enumerate(texts)), encoding="utf-8")
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps({"query_id": i + 1, "query_text": "", "item_ids": [100 + i] + list(range(9))})
                            + "\n" for i in range(len(texts))))
    accepted(muge("score", gt, pred, "--per-query", tmp_path / "q.csv"))
    raw = (tmp_path / "q.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    table = pd.read_csv(tmp_path / "q.csv", encoding="utf-8-sig", keep_default_na=False)
    assert table["query_id"].tolist() == list(range(1, len(texts) + 1))
    assert table["query_text"].tolist() == ["'=HYPERLINK(\"x\")", "'+1", "'-50%折扣", "'@SUM(A1)", "'\tq", "红\r裙",
                                            "坏\\ud800字", "普通 连衣裙", "'\0=1+1", "裙\r", "'\r", "行\u2028分"]
    rows = raw.decode("utf-8-sig").split("\r\n")[1:-1]  # CRLF ends a row; every text cell is quoted
    assert len(rows) == len(texts) and all(re.match(r'^\d+,"', r) for r in rows), rows


def test_a_batch_larger_than_the_gallery_runs_at_the_gallery_size(tiny_bundle, small_sample, tmp_path, caplog,
                                                                  monkeypatch):
    import logging

    args = ["predict", "--bundle", tiny_bundle, "--data", small_sample, "--split", "valid", "--workers", "0"]
    accepted(muge(*args, "--out", tmp_path / "a.jsonl", "--cache-dir", tmp_path / "ca", "--batch-size", "16"))
    with caplog.at_level(logging.INFO, logger="predict.submit"):
        accepted(muge(*args, "--out", tmp_path / "b.jsonl", "--cache-dir", tmp_path / "cb", "--batch-size", "100000"))
    assert "more than the gallery's 120 images: running batches of 120" in caplog.text
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    import predict.submit as submit

    monkeypatch.setattr(submit, "_memory_available", lambda: 2**18)  # 256 KiB: 120 images of 32 px do not fit
    refused(muge(*args, "--out", tmp_path / "c.jsonl", "--cache-dir", tmp_path / "cc", "--batch-size", "100000"),
            "--batch-size 100000", "lower --batch-size")
    assert not (tmp_path / "c.jsonl").exists()


@pytest.mark.parametrize("override, message", [
    ("data.augment.auto_augment=bogus", "data.augment.auto_augment='bogus': not a timm AutoAugment policy"),
    ("train.tensorboard=true", "train.tensorboard=true needs the tensorboard package")])
def test_training_options_are_checked_with_the_config(small_sample, tmp_path, monkeypatch, override, message):
    """Before the model or the data are built: no DataLoader worker's traceback."""
    import sys

    if override.startswith("train.tensorboard"):  # as on a machine without the package: its import fails
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    refused(muge("train", "--config", "configs/sample.yaml", "--data", small_sample, "--out", tmp_path / "run",
                 "--set", override), message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (["train.mask_ratio=-0.1"], "train.mask_ratio=-0.1; expected a share of patches in [0, 1)"),
    (["train.mask_ratio=1.0"], "train.mask_ratio=1.0; expected a share of patches in [0, 1)"),
    (["train.mask_schedule={0: 1.5}"], "train.mask_schedule.0=1.5"),
    (["train.mask_schedule={9: 0.0}"], "train.mask_schedule: 9 is not an epoch of this run (0 to 0"),
    (["train.mask_ratio=0.5"], "the image tower resnet10t has no patch tokens to drop"),
    (["train.mask_schedule={0: 0.5}"], "the image tower resnet10t has no patch tokens to drop"),
    (["train.mask_schedule={'０': 0.0}"], "train.mask_schedule: '０' is not an epoch of this run"),
    (["train.mask_schedule={'²': 0.0}"], "train.mask_schedule: '²' is not an epoch of this run"),
    (["train.epochs=2", "train.mask_schedule={'01': 0.0}"], "train.mask_schedule: '01' is not an epoch of this run"),
    (["train.mask_schedule={true: 0.0}"], "train.mask_schedule: True is not an epoch of this run"),
    (["train.mask_schedule={0: 0.0, '0': 0.0}"], "train.mask_schedule: epoch 0 is given twice (0 and '0')"),
    (["model.attention_heads=[true, 1]"], "model.attention_heads=[True, 1]; expected [vision, text]"),
    (["model.attention_heads=[4, 2]"], "model.attention_heads=[4, 2] is read only from a Chinese-CLIP checkpoint"),
    (["model.family=chinese-clip", "model.attention_heads=[4, 2]"], "a random Chinese-CLIP takes them from")])
def test_bad_flip_and_heads_settings_are_refused_naming_the_key(small_sample, tmp_path, overrides, message):
    """Out of range, an epoch the run does not have (or given twice, or not in plain digits), a CNN
    image tower (the tiny dual's resnet10t); attention heads that are not counts, or on a model
    that does not read them: before any training."""
    sets = [a for o in ["train.epochs=1", *overrides] for a in ("--set", o)]
    cfg = tmp_path / "tiny.yaml"
    save_config(tiny_config("dual"), str(cfg))
    refused(muge("train", "--config", cfg, "--data", small_sample, "--out", tmp_path / "run", *sets), message)


def test_flip_on_a_cnn_preset_is_refused_before_its_weights_are_fetched(small_sample, tmp_path):
    """bert-convnext names hub weights (no network here): the CNN refusal is the config's, so it
    comes first, not a download error."""
    refused(muge("train", "--config", "configs/bert-convnext.yaml", "--data", small_sample, "--out", tmp_path / "run",
                 "--set", "train.mask_ratio=0.5"), "the image tower convnext_tiny has no patch tokens to drop")
    assert not (tmp_path / "run").exists()


# -- round 4: settings checked where they are read ------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("model.inverse_temperature_init=0", "model.inverse_temperature_init=0"),
    ("model.inverse_temperature_init=-3", "model.inverse_temperature_init=-3"),
    ("model.inverse_temperature_init=0.5", "model.inverse_temperature_init=0.5; expected a finite number from 1 to "
                                           "model.inverse_temperature_max=100"),
    ("model.inverse_temperature_init=.nan", "model.inverse_temperature_init=nan"),
    ("model.inverse_temperature_init=200", "model.inverse_temperature_init=200"),
    ("model.inverse_temperature_max=.inf", "model.inverse_temperature_max=inf; expected a finite number of at least 1"),
    ("model.inverse_temperature_max=0", "model.inverse_temperature_max=0")])
def test_the_similarity_multiplier_is_refused_out_of_range_naming_the_key(small_sample, preset, tmp_path, override,
                                                                          message):
    """Never "math domain error", a divergence blamed on the rates, or a silent clamp."""
    refused(muge("train", "--config", preset, "--data", small_sample, "--out", tmp_path / "r", "--set", override),
            message, "expected a finite number")
    assert not (tmp_path / "r").exists()
    from train.config import ConfigError, load_config

    for former in ("model.logit_scale_init=0", "model.logit_scale_max=-1"):  # named as the config wrote it
        with pytest.raises(ConfigError, match=re.escape(former)):
            load_config(None, [former])


def test_a_key_the_family_does_not_read_is_warned_about_with_what_is_used(small_sample, tmp_path, caplog):
    import logging

    from competition.layout import split_files
    from train.main import build_training

    caplog.set_level(logging.WARNING, logger="train.main")
    cfg = tiny_config("chinese-clip", "model.inverse_temperature_init=50", "model.embed_dim=64")
    training = build_training(cfg, split_files(str(small_sample), "train"), str(tmp_path))
    used = training.model.logit_scale.exp().item()
    assert f"model.inverse_temperature_init is set, but the chinese-clip family does not read it (the multiplier " \
           f"starts at the model's own exp(logit_scale) = {used:.4g})" in caplog.text
    assert "model.embed_dim is set, but the chinese-clip family does not read it" in caplog.text
    caplog.clear()
    build_training(tiny_config("dual", "model.config={projection_dim: 8}"), split_files(str(small_sample), "train"),
                   str(tmp_path / "d"))
    assert "model.config is set, but the dual family does not read it" in caplog.text


@pytest.mark.stage
def test_resume_with_new_rates_and_epochs_follows_them(small_sample, tmp_path, caplog):
    """The restored optimizer takes config.yaml's rates and the schedule its length: not the
    checkpoint's, while the checkpoint's config records the new ones."""
    import logging

    from model.weights import load_checkpoint
    from train.main import train_run
    from train.scheduler import lr_factor

    base = ("data.limit_pairs=64", "eval.untrained=false", "train.warmup_steps=0", "train.min_lr_ratio=0.1")
    out = tmp_path / "run"
    train_run(tiny_config("dual", "train.epochs=1", *base), str(small_sample), str(out))
    caplog.set_level(logging.INFO, logger="train.main")
    cfg = tiny_config("dual", "train.epochs=2", "train.lr.text=1.0e-2", *base)
    train_run(cfg, str(small_sample), str(out), resume=True)
    assert "train.epochs 1 -> 2" in caplog.text and "'text': 0.01" in caplog.text
    last = load_checkpoint(str(out / "last.pt"))
    assert last["config"]["train"]["epochs"] == 2 and last["epoch"] == 2
    groups = last["optimizer"]["param_groups"]
    text = [g for g in groups if g["group"] == "text"]
    assert all(g["initial_lr"] == pytest.approx(1e-2 * g["lr_scale"]) for g in text)
    step = last["step"]  # the schedule of 2 epochs ends where the run ends: at its floor, on the new rates
    assert all(g["lr"] == pytest.approx(g["initial_lr"] * lr_factor(step, 0, step, 0.1)) for g in groups)


def test_pretrained_weights_errors_say_what_is_there(small_sample, tmp_path):
    (tmp_path / "empty").mkdir()
    args = ["--out", tmp_path / "b", "--data", small_sample]
    refused(muge("export", "--pretrained", tmp_path / "empty", *args),
            f"{tmp_path / 'empty'}: no config.json or best.pt: neither published weights")
    refused(muge("export", "--pretrained", tmp_path / "nowhere" / "x", *args), "nowhere/x: not found")
    refused(muge("export", "--pretrained", "./missing-clip.pt", *args), "./missing-clip.pt: not found")
    refused(muge("export", tmp_path / "empty", "--checkpoint", "last", *args), "no config.json or last.pt")
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_a_transformers_directory_as_run_dir_is_exported_as_published_weights(small_sample, tmp_path):
    from conftest import tiny_chinese_clip_dir

    hf = tiny_chinese_clip_dir(tmp_path / "published", small_sample)
    accepted(muge("export", hf, "--format", "hf", "--out", tmp_path / "hf"))
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert "The published weights `published`" in card and str(tmp_path) not in card
    refused(muge("export", hf, "--format", "cnclip", "--out", tmp_path / "x.pt"), "cn_clip's code cannot build this "
            "model: vision_config.intermediate_size=64")
    accepted(muge("export", hf, "--out", tmp_path / "bundle", "--data", small_sample, *FAST_EXPORT))


def test_a_former_manifest_is_read_by_its_own_names(tiny_bundle):
    from predict.manifest import BundleError, manifest_from_dict

    with open(os.path.join(tiny_bundle, "manifest.json"), encoding="utf-8") as f:
        now = json.load(f)
    former = {**{k: v for k, v in now.items() if k != "inverse_temperature"}, "format": "muge-bundle/1",
              "logit_scale": now["inverse_temperature"]}
    assert manifest_from_dict(former, "m.json").inverse_temperature == now["inverse_temperature"]
    with pytest.raises(BundleError, match=r"m.json: logit_scale=-1.0: expected a positive finite number"):
        manifest_from_dict({**former, "logit_scale": -1.0}, "m.json")
    with pytest.raises(BundleError, match="a muge-bundle/1 manifest that also has inverse_temperature, which that "
                                          "format names logit_scale"):
        manifest_from_dict({**former, "inverse_temperature": 5.0}, "m.json")
    with pytest.raises(BundleError, match="logit_scale"):  # and a /2 manifest refuses the former name
        manifest_from_dict({**now, "logit_scale": 5.0}, "m.json")
