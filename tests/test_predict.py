"""Predict: exact ranking, cache reuse and resume, bad images, submission validity. No torch here."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from competition import ImageTSV, MugeDataError, SubmissionError, check_submission, read_queries
from competition.topk import exact_topk
from predict.embed import embed_gallery, embed_queries
from predict.runtime import BundleEncoders, choose_runtime
from predict.submit import PredictOptions, predict_split


def test_exact_topk_matches_brute_force_and_breaks_ties_by_position():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((300, 16)).astype(np.float32)
    g = rng.standard_normal((2000, 16)).astype(np.float32)
    full = q @ g.T
    ref = np.lexsort((np.broadcast_to(np.arange(2000), full.shape), -full), axis=1)[:, :10]
    for chunk, block in ((2000, 1024), (300, 64), (7, 5)):
        _, pos = exact_topk(q, g, 10, gallery_chunk=chunk, query_block=block)
        assert np.array_equal(pos, ref), (chunk, block)
    gi = np.repeat(np.round(g[:100]), 3, axis=0)  # exact ties (integer-valued products)
    qi = np.round(q)
    full = qi @ gi.T
    ref = np.lexsort((np.broadcast_to(np.arange(300), full.shape), -full), axis=1)[:, :10]
    for chunk in (300, 64, 9):
        _, pos = exact_topk(qi, gi, 10, gallery_chunk=chunk)
        assert np.array_equal(pos, ref), chunk
    s, pos = exact_topk(q[:3], g[:4], 10)
    assert pos.shape == (3, 4)  # fewer gallery items than k


def test_runtime_choice_without_gpu():
    choice = choose_runtime()
    assert choice.providers == ("CPUExecutionProvider",) and not choice.fp16
    assert choose_runtime("cpu", "fp16").fp16
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        choose_runtime("cuda")


def test_predicted_ranking_equals_brute_force(tiny_bundle, small_sample, tmp_path):
    out = tmp_path / "sub.jsonl"
    summary = predict_split(tiny_bundle, str(small_sample), "valid", str(out),
                            PredictOptions(cache_dir=str(tmp_path / "cache"), workers=2, batch_size=16))
    assert summary["queries"] == 40 and 0 <= summary["mean_recall"] <= 100
    result = json.loads((tmp_path / "sub.result.json").read_text())
    assert result["success"] and result["score"] == pytest.approx(summary["mean_recall"])
    # brute force: embed everything sequentially, full score matrix, full argsort
    enc = BundleEncoders(tiny_bundle)
    tsv = ImageTSV(str(small_sample / "MR_valid_imgs.tsv"))
    from competition import resize_image

    g = np.concatenate([enc.encode_images(np.stack([resize_image(tsv.load(i), 32, "squash")])) for i in tsv.ids])
    queries = read_queries(small_sample / "MR_valid_queries.jsonl")
    q = enc.encode_text([x.text for x in queries])
    order = np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :10]
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    for line, row in zip(lines, order):
        assert line["item_ids"] == tsv.ids[row].tolist()
    assert check_submission(small_sample / "MR_valid_queries.jsonl", out).ok


def test_cache_reuse_and_resume_after_interruption(tiny_bundle, small_sample, tmp_path):
    enc = BundleEncoders(tiny_bundle)
    tsv_path = str(small_sample / "MR_test_imgs.tsv")
    cache = str(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        embed_gallery(enc, tsv_path, cache, workers=2, batch_size=8, chunk_size=32, stop_after_chunks=2)
    chunks = [f for _, _, fs in os.walk(cache) for f in fs if f.startswith("chunk-")]
    assert sorted(chunks) == ["chunk-00000.npz", "chunk-00001.npz"]
    resumed = embed_gallery(enc, tsv_path, cache, workers=2, batch_size=8, chunk_size=32)
    fresh = embed_gallery(enc, tsv_path, str(tmp_path / "fresh"), workers=0, batch_size=8, chunk_size=32)
    assert not resumed.from_cache and np.array_equal(resumed.ids, fresh.ids)
    assert np.allclose(resumed.features, fresh.features, atol=1e-6)
    again = embed_gallery(enc, tsv_path, cache, workers=2, batch_size=8, chunk_size=32)
    assert again.from_cache and np.array_equal(again.features, resumed.features)
    q1 = embed_queries(enc, str(small_sample / "MR_test_queries.jsonl"), cache)[1]
    q2 = embed_queries(enc, str(small_sample / "MR_test_queries.jsonl"), cache)[1]
    assert np.array_equal(q1, q2)


@pytest.fixture
def broken_data(small_sample, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(small_sample, d, ignore=shutil.ignore_patterns("*.idx.npz"))
    lines = (d / "MR_test_imgs.tsv").read_text().splitlines(keepends=True)
    bad_id = int(lines[4].split("\t")[0])
    lines[4] = f"{bad_id}\tbm90IGFuIGltYWdl\n"  # base64 of "not an image"
    (d / "MR_test_imgs.tsv").write_text("".join(lines))
    return d, bad_id


def test_bad_gallery_image_stops_or_is_skipped(tiny_bundle, broken_data, tmp_path):
    d, bad_id = broken_data
    opts = PredictOptions(cache_dir=str(tmp_path / "cache"), workers=2, batch_size=16)
    with pytest.raises(MugeDataError, match=rf"MR_test_imgs.tsv:5: image {bad_id}: bytes are not an image"):
        predict_split(tiny_bundle, str(d), "test", str(tmp_path / "a.jsonl"), opts)
    assert not (tmp_path / "a.jsonl").exists()
    opts.skip_bad_images = True
    summary = predict_split(tiny_bundle, str(d), "test", str(tmp_path / "b.jsonl"), opts)
    assert summary["skipped_images"] == 1
    ids = {i for line in (tmp_path / "b.jsonl").read_text().splitlines() for i in json.loads(line)["item_ids"]}
    assert bad_id not in ids


def test_empty_query_gets_prediction_and_duplicates_are_refused(tiny_bundle, small_sample, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(small_sample, d, ignore=shutil.ignore_patterns("*.idx.npz"))
    path = d / "MR_test_queries.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    lines[0] = json.dumps({"query_id": first["query_id"], "query_text": ""})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "sub.jsonl"
    predict_split(tiny_bundle, str(d), "test", str(out), PredictOptions(cache_dir=str(tmp_path / "c"), workers=0))
    assert len(json.loads(out.read_text(encoding="utf-8").splitlines()[0])["item_ids"]) == 10
    path.write_text("\n".join(lines + [lines[1]]) + "\n", encoding="utf-8")
    with pytest.raises(MugeDataError, match="duplicate query id"):
        predict_split(tiny_bundle, str(d), "test", str(tmp_path / "dup.jsonl"),
                      PredictOptions(cache_dir=str(tmp_path / "c2"), workers=0))


def test_writer_refuses_a_missing_query(tmp_path):
    from competition import Query, write_submission

    with pytest.raises(SubmissionError, match="1 query has no prediction: 2"):
        write_submission(tmp_path / "s.jsonl", [Query(1, "a"), Query(2, "b")], {1: list(range(10))})


def test_predict_does_not_import_torch(tiny_bundle, small_sample, tmp_path):
    code = ("import sys; from predict.submit import predict_split, PredictOptions; "
            f"predict_split({tiny_bundle!r}, {str(small_sample)!r}, 'test', {str(tmp_path / 's.jsonl')!r}, "
            f"PredictOptions(cache_dir={str(tmp_path / 'c')!r}, workers=0)); "
            "bad = [m for m in ('torch', 'train', 'transformers', 'timm') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
