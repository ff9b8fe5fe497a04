"""Export: tiny dual and tiny Chinese-CLIP runs -> bundle -> ORT, behind the parity gate."""
import json
import logging
import os

import numpy as np
import onnx
import pytest
import torch

from competition import ImageTSV, read_queries
from export.bundle import GRAPHS, INT8_GRAPHS, ExportOptions, export_bundle
from export.parity import (
    ParityError,
    ParityLimits,
    ParityReport,
    ParitySettings,
    check_bundle,
    gate_inputs,
    torch_embeddings,
)
from model.factory import run_model
from predict.manifest import read_manifest
from predict.runtime import BundleEncoders, bundle_tokenizer

FAST = ParitySettings(queries=40, gallery=60, batch_size=16)


def run_parity(model, bundle_dir: str, queries_path: str, tsv_path: str, *, settings: ParitySettings | None = None,
               limits: ParityLimits | None = None, device: str = "auto") -> ParityReport:
    """The gate on a written bundle against `model`: its reference embeddings, then `check_bundle`."""
    settings = settings or ParitySettings()
    manifest = read_manifest(bundle_dir)
    inputs = gate_inputs(queries_path, tsv_path, settings, manifest.image_size, manifest.resize_rule)
    tokenizer = bundle_tokenizer(bundle_dir, manifest)
    model = model.eval().float().cpu()
    reference = {kind: torch_embeddings(model, kind, inputs, tokenizer, settings.batch_size)
                 for kind in ("text", "image")}
    return check_bundle(reference, bundle_dir, inputs, settings=settings, limits=limits, device=device)


@pytest.mark.parametrize("family, exporter, fused", [  # the dynamo exporter takes twice as long: the slow set's
    pytest.param("dual", "dynamo", True, marks=pytest.mark.slow),
    pytest.param("chinese-clip", "dynamo", False, marks=pytest.mark.slow), ("dual", "torchscript", False)])
@pytest.mark.stage
def test_export_loads_and_passes_gate(runs, small_sample, tmp_path, monkeypatch, family, exporter, fused):
    """`exporter` applies to the graphs not fused: the image CNN, or every graph with fused=False."""
    out = tmp_path / "bundle"
    opts = ExportOptions(exporter=exporter, settings=FAST, fused=fused)
    manifest = export_bundle(runs[family], str(out), str(small_sample), opts)
    for name in GRAPHS + ("manifest.json", "tokenizer/tokenizer.json"):
        assert (out / name).exists(), name
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["parity"]["passed"] and on_disk["embed_dim"] == 32 and on_disk["image_size"] == 32
    assert len(on_disk["source_sha256"]) == 64 and on_disk["family"] == family
    assert manifest.files == on_disk["files"]
    # fp16 graphs keep fp32 / uint8 / int64 inputs and outputs
    for name, inputs in (("image.fp16.onnx", {"pixels": onnx.TensorProto.UINT8}),
                         ("text.fp16.onnx", {"input_ids": onnx.TensorProto.INT64})):
        graph = onnx.load(str(out / name)).graph
        assert {i.name: i.type.tensor_type.elem_type for i in graph.input if i.name in inputs} == inputs
        assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # dynamic batch and sequence: the gate at batch 1 and 7 (different padded lengths per batch)
    model = run_model(runs[family]).model
    for bs in (1, 7):
        report = run_parity(model, str(out), str(small_sample / "MR_valid_queries.jsonl"),
                            str(small_sample / "MR_valid_imgs.tsv"), settings=ParitySettings(21, 21, bs))
        assert report.passed, report.render()
    import predict.runtime as runtime

    monkeypatch.setattr(runtime, "cuda_device_count", lambda: 0)  # without a GPU (simulated on any machine)
    enc = BundleEncoders(str(out))
    assert enc.choice.device == "cpu" and not enc.choice.fp16  # CPU + fp32
    short, long = enc.encode_text(["红"]), enc.encode_text(["红色条纹连衣裙女夏季新款 ins风 百搭 学生 大容量"])
    assert short.shape == long.shape == (1, 32)
    with torch.no_grad():
        ids, mask = enc.tokenizer(["红色条纹连衣裙女夏季新款 ins风 百搭 学生 大容量"])
        ref = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert np.abs(ref - long).max() < 1e-4


@pytest.mark.slow
def test_corrupted_export_fails_gate_and_leaves_no_bundle(runs, small_sample, tmp_path, monkeypatch):
    import export.optimize as optimize_mod
    from export.graphs import export_graph as real_export

    def perturbed(model, kind, path, example, opset=18, exporter="dynamo"):
        real_export(model, kind, path, example, opset, exporter)
        if kind == "image":  # nudge every weight: a silently wrong export
            m = onnx.load(path)
            for init in m.graph.initializer:
                arr = onnx.numpy_helper.to_array(init)
                if arr.dtype == np.float32 and arr.size > 16:
                    init.CopyFrom(onnx.numpy_helper.from_array(arr * 1.05 + 0.01, init.name))
            onnx.save(m, path)
        return path

    monkeypatch.setattr(optimize_mod, "export_graph", perturbed)  # the graphs export_bundle writes
    out = tmp_path / "bundle"
    with pytest.raises(ParityError) as err:
        export_bundle(runs["dual"], str(out), str(small_sample), ExportOptions(exporter="torchscript", settings=FAST))
    assert "fp32 image max |diff|" in str(err.value)
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # the temporary build directory is gone too


@pytest.mark.slow
def test_failed_export_keeps_previous_bundle(runs, small_sample, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    export_bundle(runs["dual"], str(out), str(small_sample), ExportOptions(exporter="torchscript", settings=FAST))
    before = (out / "manifest.json").read_text()
    import export.optimize as optimize_mod

    def broken(*a, **k):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(optimize_mod, "export_graph", broken)
    with pytest.raises(RuntimeError):
        export_bundle(runs["dual"], str(out), str(small_sample), ExportOptions(exporter="torchscript", settings=FAST))
    assert (out / "manifest.json").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["bundle"]


def test_ranking_agreement_accepts_near_ties_and_catches_wrong_rows():
    from export.parity import ranking_agreement

    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    q = unit(rng.standard_normal((200, 32)).astype(np.float32))
    # a near-tied gallery: one shared direction plus small per-image variation
    g = unit(rng.standard_normal(32).astype(np.float32) + 0.02 * rng.standard_normal((500, 32)).astype(np.float32))
    noisy_g = unit(g + 2e-4 * rng.standard_normal(g.shape).astype(np.float32))  # fp16-sized error
    fine = ranking_agreement(q, g, q, noisy_g)
    assert fine["overlap"] < 0.95  # raw overlap punishes the reordered near-ties ...
    assert fine["tie_aware"] == 1.0 and fine["score_error"] < 1e-3  # ... every intruder is explained
    broken_q = q.copy()
    broken_q[:20] = q[20:40]  # 10% of the queries encoded as other queries: a real defect
    broken = ranking_agreement(q, g, broken_q, noisy_g)
    assert broken["tie_aware"] < 0.95 and broken["score_error"] < 1e-3  # the broken rows excuse nothing
    broken_g = noisy_g.copy()
    broken_g[:50] = noisy_g[::-1][:50]  # 10% of the images likewise
    assert ranking_agreement(q, g, q, broken_g)["tie_aware"] < 0.99


def _near_tied_run(run_dir, out, alpha=0.01):
    """The trained tiny dual run with image embeddings squeezed around one direction: scores keep
    their order but sit about `alpha` apart, close enough for fp16 to reorder near-ties."""
    import shutil

    from model.weights import load_checkpoint
    from train.checkpoint import save_checkpoint

    model, ckpt = run_model(run_dir).model, load_checkpoint(os.path.join(run_dir, "best.pt"))
    last = model.image_proj[-1]
    with torch.no_grad():
        last.weight.mul_(alpha)
        last.bias.copy_(torch.randn(last.bias.shape, generator=torch.Generator().manual_seed(0)))
    shutil.copytree(run_dir, out)
    save_checkpoint(str(out / "best.pt"), {**ckpt, "model": model.state_dict()})
    return str(out)


@pytest.mark.slow
def test_gate_passes_a_near_tied_model_and_reports_every_figure(runs, small_sample, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="export.bundle")
    run_dir = _near_tied_run(runs["dual"], tmp_path / "near-tied")
    opts = ExportOptions(exporter="torchscript", settings=ParitySettings(40, 120, 16), device="cpu")
    manifest = export_bundle(run_dir, str(tmp_path / "bundle"), str(small_sample), opts)
    report = manifest.parity
    assert report["passed"] and report["recall_queries"] > 0
    assert report["fp16"]["top10_overlap"] < 0.95  # a rule on raw overlap would refuse this export
    assert report["fp16"]["top10_tie_aware"] >= 0.99
    assert abs(report["fp16"]["recall_delta"]) <= report["fp16"]["recall_tolerance"]
    for words in ("explained by score error", "raw top-10 overlap", "MeanRecall on", "delta", "PASSED"):
        assert words in caplog.text


@pytest.mark.slow
def test_gate_fails_non_finite_fp16_outputs_and_leaves_no_bundle(runs, small_sample, tmp_path, monkeypatch):
    import export.bundle as bundle_mod
    from export.fp16 import to_fp16 as real_to_fp16

    def poisoned(src, dst):  # one NaN weight in the fp16 image graph: every image embedding is NaN
        real_to_fp16(src, dst)
        if "image" in os.path.basename(dst):
            m = onnx.load(dst)
            init = next(i for i in m.graph.initializer if onnx.numpy_helper.to_array(i).size > 16)
            arr = onnx.numpy_helper.to_array(init).copy()
            arr.flat[0] = np.nan
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
            onnx.save(m, dst)
        return dst

    monkeypatch.setattr(bundle_mod, "to_fp16", poisoned)
    out = tmp_path / "bundle"
    with pytest.raises(ParityError, match=r"fp16 image embeddings not finite in 60 of 60 rows \(first: image \d+\)"):
        export_bundle(runs["dual"], str(out), str(small_sample), ExportOptions(exporter="torchscript", settings=FAST))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow  # a whole chain twice: fused and int8 export, predict, then a plain export
@pytest.mark.parametrize("family", ["dual", "chinese-clip"])
def test_fused_and_int8_graphs_pass_the_gate_and_predict(runs, small_sample, tmp_path, family):
    """Transformer towers ship fused (one Attention node per layer; the tiny towers have 2), fp16
    is made from the fused graph, and --int8 adds gated int8 graphs that `--precision int8` runs."""
    from predict.manifest import BundleError
    from predict.submit import PredictOptions, predict_split

    out = tmp_path / "bundle"
    manifest = export_bundle(runs[family], str(out), str(small_sample), ExportOptions(settings=FAST, int8=True))
    fusion = manifest.fusion
    assert fusion["text"]["Attention"] == 2 and fusion["text"]["SkipLayerNormalization"] >= 2
    assert fusion["image"].get("Attention", 0) == (2 if family == "chinese-clip" else 0)  # a CNN has none
    for name in ("text.onnx", "text.fp16.onnx", "text.int8.onnx"):
        ops = {n.op_type for n in onnx.load(str(out / name)).graph.node}
        assert {"Attention", "QAttention"} & ops, name
    assert set(INT8_GRAPHS) <= manifest.files.keys()
    report = manifest.parity
    assert report["passed"] and report["int8"]["top10_tie_aware"] >= report["limits"]["int8"]["min_tie_aware"]
    assert abs(report["int8"]["recall_delta"]) <= report["int8"]["recall_tolerance"]
    summary = predict_split(str(out), str(small_sample), "valid", str(tmp_path / "valid.jsonl"),
                            PredictOptions(precision="int8", workers=1, cache_dir=str(tmp_path / "cache")))
    assert "int8 graphs" in summary["runtime"]
    from conftest import brute_force_top10, submission_lists

    int8 = BundleEncoders(str(out), precision="int8", batch_size=64)  # predict's CPU batch
    queries = read_queries(small_sample / "MR_valid_queries.jsonl")
    tsv = ImageTSV(str(small_sample / "MR_valid_imgs.tsv"))
    expected = brute_force_top10(int8.encode_text, int8.encode_images, queries, tsv, int8.image_size,
                                 one_at_a_time=False)
    assert submission_lists(tmp_path / "valid.jsonl") == expected  # the int8 graphs' own ranking
    plain = tmp_path / "plain"
    export_bundle(runs[family], str(plain), str(small_sample), ExportOptions(settings=FAST))
    with pytest.raises(BundleError, match="no int8 graphs: export it with `muge export --int8`"):
        BundleEncoders(str(plain), precision="int8")


@pytest.mark.slow
def test_flip_settings_change_no_graph(runs, small_sample, tmp_path):
    """train.mask_ratio is training's alone: the same weights export to the same graphs, and
    score the same in the gate, with or without it in the run's config."""
    import shutil

    from model.weights import load_checkpoint
    from train.checkpoint import save_checkpoint

    masked = tmp_path / "masked-run"
    shutil.copytree(runs["chinese-clip"], masked)
    ckpt = load_checkpoint(str(masked / "best.pt"))
    ckpt["config"]["train"].update(mask_ratio=0.5, mask_schedule={0: 0.75})
    save_checkpoint(str(masked / "best.pt"), ckpt)
    fast = ExportOptions(settings=FAST)
    plain = export_bundle(runs["chinese-clip"], str(tmp_path / "plain"), str(small_sample), fast)
    flip = export_bundle(str(masked), str(tmp_path / "flip"), str(small_sample), fast)
    assert plain.files == flip.files
    assert plain.parity["fp32"] == flip.parity["fp32"]
