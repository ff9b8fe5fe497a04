"""Graphs over protobuf's 2 GiB limit, with the limit lowered (`export.files.MAX_SINGLE_FILE_BYTES`)
so tiny models take the external-data path: export, fusion, fp16, int8, the gate, predict, an
ensemble and the gallery cache; a missing, truncated or altered data file is refused at load."""
import json
import os

import numpy as np
import onnx
import pytest
from conftest import accepted, muge, refused

from export.bundle import GRAPHS, INT8_GRAPHS, ExportOptions, export_bundle
from export.parity import ParitySettings
from predict.runtime import BundleEncoders

FAST = ParitySettings(queries=40, gallery=60, batch_size=16)
LIMIT = 20_000  # bytes of tensors: every tiny graph is over it


@pytest.fixture(scope="module")
def large_bundles(runs, small_sample, tmp_path_factory):
    """Both families exported with the lowered limit (fused, with int8), and the dual one as it
    ships today (one file a graph), from the same run."""
    import export.files as graphs

    out = tmp_path_factory.mktemp("large")
    saved = graphs.MAX_SINGLE_FILE_BYTES
    graphs.MAX_SINGLE_FILE_BYTES = LIMIT
    try:
        for family in ("dual", "chinese-clip"):
            export_bundle(runs[family], str(out / family), str(small_sample), ExportOptions(settings=FAST, int8=True))
    finally:
        graphs.MAX_SINGLE_FILE_BYTES = saved
    export_bundle(runs["dual"], str(out / "plain"), str(small_sample), ExportOptions(settings=FAST, int8=True))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dual", "chinese-clip"])
def test_every_graph_over_the_limit_is_written_with_external_data_and_passes_the_gate(large_bundles, family):
    bundle = large_bundles / family
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["parity"]["passed"]
    for name in GRAPHS + INT8_GRAPHS:
        data = name + ".data"
        assert manifest["external_data"][name] == [data], name
        assert (bundle / data).is_file() and data in manifest["files"], name
        # the graph file holds no tensor bytes of its own: each one points into its data file
        proto = onnx.load(str(bundle / name), load_external_data=False)
        assert proto.graph.initializer and all(t.data_location == onnx.TensorProto.EXTERNAL
                                               for t in proto.graph.initializer if t.ByteSize() > 2048), name
        assert os.path.getsize(bundle / name) < os.path.getsize(bundle / data)
    left = sorted(p for p in os.listdir(bundle) if p not in manifest["files"])
    assert left == [".muge-output.json", ".verified.json", "manifest.json", "tokenizer"], left  # no stray exporter file


@pytest.mark.slow
def test_an_external_data_bundle_predicts_what_the_single_file_bundle_predicts(large_bundles, small_sample, tmp_path):
    """Same run, same graphs in the other layout: the same embeddings, submissions, ensemble and
    cache behaviour."""
    plain, large = large_bundles / "plain", large_bundles / "dual"
    assert "external_data" not in json.loads((plain / "manifest.json").read_text())
    for precision in ("fp32", "int8"):
        a = BundleEncoders(str(plain), device="cpu", precision=precision, batch_size=8)
        b = BundleEncoders(str(large), device="cpu", precision=precision, batch_size=8)
        texts = ["红色连衣裙", "黑色运动鞋男"]
        np.testing.assert_array_equal(a.encode_text(texts), b.encode_text(texts))
    cache = tmp_path / "cache"
    runs = {}
    ensemble = [large, large_bundles / "chinese-clip"]
    for name, bundles in (("plain", [plain]), ("large", [large]), ("ensemble", ensemble)):
        out = tmp_path / f"{name}.jsonl"
        args = [a for b in bundles for a in ("--bundle", b)]
        result = accepted(muge("predict", *args, "--data", small_sample, "--split", "valid", "--out", out,
                               "--cache-dir", cache, "--workers", "0", "--device", "cpu"))
        runs[name] = (out.read_text(), json.loads(result.output.strip().splitlines()[-1]))
    assert runs["plain"][0] == runs["large"][0]
    assert runs["ensemble"][1]["mean_recall"] >= 0
    again = accepted(muge("predict", "--bundle", large, "--data", small_sample, "--split", "valid", "--out",
                          tmp_path / "again.jsonl", "--cache-dir", cache, "--workers", "0", "--device", "cpu"))
    assert (tmp_path / "again.jsonl").read_text() == runs["large"][0]
    assert "cache" in again.output.lower()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["removed", "truncated", "altered"])
def test_a_damaged_external_data_file_is_refused_naming_it(large_bundles, small_sample, tmp_path, damage):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(large_bundles / "dual", bundle)
    data = bundle / "image.onnx.data"
    if damage == "removed":
        data.unlink()
    elif damage == "truncated":
        with open(data, "r+b") as f:
            f.truncate(os.path.getsize(data) // 2)
    else:
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    expect = "not found" if damage == "removed" else "external data was altered, truncated"
    refused(muge("predict", "--bundle", bundle, "--data", small_sample, "--split", "valid", "--out",
                 tmp_path / "p.jsonl", "--cache-dir", tmp_path / "cache", "--workers", "0", "--device", "cpu"),
            str(data), expect)
    assert not (tmp_path / "p.jsonl").exists()


def _point_tensors_at(graph, location: str) -> None:
    """Rewrite every external tensor of `graph` to name `location` (the bytes stay where they are)."""
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load(str(graph), load_external_data=False)
    for tensor in _get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    graph.write_bytes(model.SerializeToString())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unlisted", "manifest-outside", "graph-outside", "symlink"])
def test_a_bundle_opens_no_file_it_has_not_verified(large_bundles, small_sample, tmp_path, monkeypatch, case):
    """The data files to verify are the ones the graph's tensors name, each listed in the manifest
    with its sha256: one the manifest leaves out is refused, even with its bytes altered; a name
    outside the bundle (in the manifest or in the graph) is refused before anything is opened; a
    data file linked to storage elsewhere is refused up front with what to do."""
    import builtins
    import shutil

    from infra.io import sha256

    bundle = tmp_path / "bundle"
    shutil.copytree(large_bundles / "dual", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    outside = tmp_path / "outside.data"
    shutil.copy(bundle / "image.onnx.data", outside)
    if case == "unlisted":
        del manifest["external_data"]["image.onnx"], manifest["files"]["image.onnx.data"]
        raw = bytearray((bundle / "image.onnx.data").read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (bundle / "image.onnx.data").write_bytes(bytes(raw))
        expect = ["manifest.json: external_data lists no files for image.onnx, but its tensors are in "
                  "['image.onnx.data']"]
    elif case == "manifest-outside":
        manifest["external_data"]["image.onnx"] = ["../outside.data"]
        manifest["files"]["../outside.data"] = manifest["files"].pop("image.onnx.data")
        expect = ["manifest.json: files: '../outside.data' is not a file name inside the bundle"]
    elif case == "graph-outside":
        _point_tensors_at(bundle / "image.onnx", "../outside.data")
        manifest["files"]["image.onnx"] = sha256(bundle / "image.onnx")
        expect = ["image.onnx: its tensors name external data '../outside.data', which is not a file inside the bundle"]
    else:
        store = tmp_path / "store"
        store.mkdir()
        shutil.move(bundle / "image.onnx.data", store / "blob")
        (bundle / "image.onnx.data").symlink_to(store / "blob")
        expect = ["image.onnx.data is a symbolic link", "copy the file in"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    opened, real_open = [], builtins.open
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: (opened.append(str(file)), real_open(file, *a, **k))[1])
    refused(muge("predict", "--bundle", bundle, "--data", small_sample, "--split", "valid", "--out",
                 tmp_path / "p.jsonl", "--cache-dir", tmp_path / "cache", "--workers", "0", "--device", "cpu"), *expect)
    assert not [p for p in opened if "outside.data" in p or p.startswith(str(tmp_path / "store"))]
    assert not (tmp_path / "p.jsonl").exists()
