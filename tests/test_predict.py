"""Predict: exact ranking, cache reuse and resume, bad images, submission validity. No torch here."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import not_an_image

from competition import ImageTSV, MugeDataError, SubmissionError, check_submission, read_queries
from competition.topk import NonFiniteError, exact_topk
from predict.embed import embed_gallery, embed_queries
from predict.runtime import BundleEncoders, choose_runtime, text_lengths
from predict.submit import PredictOptions, predict_split


class RecordingSession:
    """Wraps an ORT session: records every input shape; optionally poisons output rows with NaN."""

    def __init__(self, session, poison_rows=()):
        self.session, self.poison_rows, self.shapes = session, list(poison_rows), []

    def run(self, names, feeds):
        self.shapes.append(tuple(tuple(v.shape) for v in feeds.values()))
        out = self.session.run(names, feeds)
        if self.poison_rows:
            out[0] = out[0].copy()
            out[0][self.poison_rows] = np.nan
        return out


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


def test_exact_topk_refuses_non_finite_rows_naming_them():
    """Documented behaviour: NaN/inf embeddings raise NonFiniteError naming the first bad row,
    for queries, a resident gallery and a chunked one; finite rows whose products overflow too."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((50, 8)).astype(np.float32)
    g = rng.standard_normal((100, 8)).astype(np.float32)
    bad_q = q.copy()
    bad_q[7, 3] = np.nan
    with pytest.raises(NonFiniteError, match="queries row 7 is not finite"):
        exact_topk(bad_q, g)
    for value in (np.inf, -np.inf, np.nan):
        bad_g = g.copy()
        bad_g[63, 0] = value
        for chunk in (32768, 16):  # resident, and read chunk by chunk
            with pytest.raises(NonFiniteError, match="gallery row 63 is not finite"):
                exact_topk(q, bad_g, gallery_chunk=chunk)
    huge = q.copy()
    huge[4] = [3e38, 3e38, 0, 0, 0, 0, 0, 0]  # finite, but its products overflow to inf - inf
    g2 = g.copy()
    g2[:, :2] = [2.0, -2.0]
    for chunk in (32768, 16):
        with pytest.raises(NonFiniteError, match="scores would overflow float32: queries row 4 holds"):
            exact_topk(huge, g2, gallery_chunk=chunk)


def test_runtime_choice_with_and_without_gpu(monkeypatch):
    import predict.runtime as runtime

    monkeypatch.setattr(runtime, "cuda_device_count", lambda: 0)  # simulated absence, on any machine
    choice = choose_runtime()
    assert choice.providers == ("CPUExecutionProvider",) and not choice.fp16
    assert choose_runtime("cpu", "fp16").fp16
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        choose_runtime("cuda")
    monkeypatch.setattr(runtime, "cuda_device_count", lambda: 1)  # simulated presence (onnxruntime-gpu lists CUDA)
    choice = choose_runtime()
    assert choice.providers[0] == "CUDAExecutionProvider" and choice.fp16 and choice.device == "cuda"
    assert not choose_runtime("auto", "fp32").fp16 and choose_runtime("cpu").device == "cpu"


def test_sessions_see_fixed_shapes_on_a_ragged_gallery_with_skipped_images(tiny_bundle, broken_data, tmp_path):
    """Image graph: one batch shape whatever the tail or the skipped images; text: one batch size
    and a few lengths. The padded calls give the same embeddings as unpadded ones."""
    d, bad_id = broken_data
    enc = BundleEncoders(tiny_bundle, device="cpu", batch_size=16, text_batch=32)
    enc.image, enc.text = RecordingSession(enc.image), RecordingSession(enc.text)
    n_images = len(ImageTSV(str(d / "MR_test_imgs.tsv")))
    assert n_images % 16 and len(read_queries(d / "MR_test_queries.jsonl")) % 32
    opts = PredictOptions(cache_dir=str(tmp_path / "cache"), workers=2, skip_bad_images=True)
    summary = predict_split(tiny_bundle, str(d), "test", str(tmp_path / "s.jsonl"), opts, encoders=enc)
    assert summary["skipped_images"] == 1 and summary["gallery"] == n_images - 1
    assert set(enc.image.shapes) == {((16, 32, 32, 3),)}
    assert len(enc.image.shapes) == -(-n_images // 16)  # one call per decode range, short ones padded
    lengths = {shape[0][1] for shape in enc.text.shapes}
    assert {shape[0][0] for shape in enc.text.shapes} == {32} and lengths <= set(text_lengths(24)) == {16, 24}
    # padding changes nothing: a lone image and a lone short query, padded to the batch
    ref = BundleEncoders(tiny_bundle, device="cpu", batch_size=1, text_batch=1)
    tsv = ImageTSV(str(d / "MR_valid_imgs.tsv"))
    from competition import resize_image

    pix = np.stack([resize_image(tsv.load(i), 32, "squash") for i in tsv.ids[:3]])
    assert np.abs(enc.encode_images(pix) - ref.encode_images(pix)).max() < 1e-5
    assert np.abs(enc.encode_text(["红", "蓝色"]) - ref.encode_text(["红", "蓝色"])).max() < 1e-5
    enc.image.shapes.clear()
    enc.text.shapes.clear()
    assert enc.warmup() > 0
    assert len(enc.image.shapes) == 1 and sorted(s[0][1] for s in enc.text.shapes) == [16, 24]


def test_predict_refuses_non_finite_embeddings_naming_the_graph(tiny_bundle, small_sample, tmp_path):
    out = tmp_path / "s.jsonl"
    enc = BundleEncoders(tiny_bundle, device="cpu", batch_size=16)
    enc.image = RecordingSession(enc.image, poison_rows=[3])
    tsv = ImageTSV(str(small_sample / "MR_test_imgs.tsv"))
    opts = PredictOptions(cache_dir=str(tmp_path / "cache"), workers=0)
    with pytest.raises(NonFiniteError) as err:
        predict_split(tiny_bundle, str(small_sample), "test", str(out), opts, encoders=enc)
    assert "image.onnx gave a non-finite embedding for image" in str(err.value)
    assert f"image {tsv.ids[3]} (" in str(err.value) and "MR_test_imgs.tsv:4)" in str(err.value)
    assert not out.exists()
    assert not [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs if f.endswith(".npz")]  # nothing cached
    enc = BundleEncoders(tiny_bundle, device="cpu", batch_size=16, text_batch=16)
    enc.text = RecordingSession(enc.text, poison_rows=[2])
    queries = read_queries(small_sample / "MR_test_queries.jsonl")
    with pytest.raises(NonFiniteError, match=rf"text.onnx gave a non-finite embedding for query "
                                             rf"{queries[2].query_id} \(.*MR_test_queries.jsonl:3\)"):
        predict_split(tiny_bundle, str(small_sample), "test", str(out), opts, encoders=enc)
    assert not out.exists()


def test_predicted_ranking_equals_brute_force(tiny_bundle, small_sample, tmp_path):
    from conftest import brute_force_top10, submission_lists

    out = tmp_path / "sub.jsonl"
    summary = predict_split(tiny_bundle, str(small_sample), "valid", str(out),
                            PredictOptions(cache_dir=str(tmp_path / "cache"), workers=2, batch_size=16))
    # brute force: embed everything one image at a time (padded to the same graph batch), full argsort
    enc = BundleEncoders(tiny_bundle, batch_size=16)
    queries = read_queries(small_sample / "MR_valid_queries.jsonl")
    expected = brute_force_top10(enc.encode_text, enc.encode_images, queries,
                                 ImageTSV(str(small_sample / "MR_valid_imgs.tsv")), enc.image_size)
    assert submission_lists(out) == expected
    from competition import score_predictions

    mr = score_predictions(queries, {q.query_id: ids for q, ids in zip(queries, expected)}).mean_recall
    result = json.loads((tmp_path / "sub.result.json").read_text())
    assert summary["queries"] == 40 and summary["mean_recall"] == pytest.approx(mr) == result["score"]
    assert check_submission(small_sample / "MR_valid_queries.jsonl", out).ok


def test_cache_reuse_and_resume_after_interruption(tiny_bundle, small_sample, tmp_path, monkeypatch):
    import predict.embed as embed_mod

    enc = BundleEncoders(tiny_bundle, batch_size=8)
    tsv_path = str(small_sample / "MR_test_imgs.tsv")
    cache = str(tmp_path / "cache")
    real_save, saved = embed_mod.save_npz, []

    def interrupted_after_two_chunks(path, **arrays):  # Ctrl-C while the third chunk is being saved
        if len(saved) == 2:
            raise KeyboardInterrupt
        real_save(path, **arrays)
        saved.append(path)

    monkeypatch.setattr(embed_mod, "save_npz", interrupted_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        embed_gallery(enc, tsv_path, cache, workers=2, chunk_size=32)
    monkeypatch.setattr(embed_mod, "save_npz", real_save)
    chunks = [f for _, _, fs in os.walk(cache) for f in fs if f.startswith("chunk-")]
    assert sorted(chunks) == ["chunk-00000.npz", "chunk-00001.npz"]
    resumed = embed_gallery(enc, tsv_path, cache, workers=2, chunk_size=32)
    fresh = embed_gallery(enc, tsv_path, str(tmp_path / "fresh"), workers=0, chunk_size=32)
    assert not resumed.from_cache and np.array_equal(resumed.ids, fresh.ids)
    assert np.allclose(resumed.features, fresh.features, atol=1e-6)
    again = embed_gallery(enc, tsv_path, cache, workers=2, chunk_size=32)
    assert again.from_cache and np.array_equal(again.features, resumed.features)
    q1 = embed_queries(enc, str(small_sample / "MR_test_queries.jsonl"), cache)[1]
    monkeypatch.setattr(enc, "encode_text", lambda texts: pytest.fail("the query embeddings were not reused"))
    q2 = embed_queries(enc, str(small_sample / "MR_test_queries.jsonl"), cache)[1]
    assert np.array_equal(q1, q2)


@pytest.fixture
def broken_data(small_sample, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(small_sample, d, ignore=shutil.ignore_patterns("*.idx.npz"))
    lines = (d / "MR_test_imgs.tsv").read_bytes().splitlines(keepends=True)
    bad_id = int(lines[4].split(b"\t")[0])
    lines[4] = not_an_image(lines[4])
    (d / "MR_test_imgs.tsv").write_bytes(b"".join(lines))
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
