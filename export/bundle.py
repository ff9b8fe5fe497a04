"""Checkpoint -> bundle: `text.onnx`, `image.onnx` (transformer towers fused, `export.optimize`),
their fp16 twins, with `--int8` their int8 twins, `tokenizer/` and `manifest.json`; everything
`predict` needs and nothing more. A graph over protobuf's 2 GiB limit has its tensors in
`NAME.onnx.data` beside it (`export.files.save_graph`); the manifest's `files` hashes every
file, and `external_data` names each graph's data file. Built in a temporary directory
beside the destination and renamed into place only after every graph passes `onnx.checker`,
loads in ONNX Runtime and passes the parity gate."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from importlib import metadata

import torch

from competition import read_queries
from competition.layout import split_files
from infra.io import sha256
from infra.outputs import OutputKind, json_with_keys, staged_dir
from model.factory import LoadedModel, load_model, source_paths
from model.tokenizer import check_tokenizer
from predict.manifest import MANIFEST, Manifest, write_manifest

from .files import check_graph, graph_files
from .fp16 import to_fp16
from .memory import free_memory
from .optimize import export_tower, prepare_fusion, to_int8
from .parity import ParityError, ParityLimits, ParitySettings, check_bundle, gate_inputs, torch_embeddings

log = logging.getLogger(__name__)
GRAPHS = ("text.onnx", "image.onnx", "text.fp16.onnx", "image.fp16.onnx")
INT8_GRAPHS = ("text.int8.onnx", "image.int8.onnx")


def _versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "timm", "onnx", "onnxscript", "onnxruntime-gpu", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class ExportOptions:
    """How `muge export` builds a bundle (its command-line options)."""
    checkpoint: str = "best"           # best | last | a .pt path
    opset: int = 18
    exporter: str = "dynamo"           # dynamo | torchscript, for the graphs not fused
    settings: ParitySettings = field(default_factory=ParitySettings)
    limits: ParityLimits | None = None
    device: str = "auto"               # where the fp16 graphs are checked
    fused: bool = True                 # transformer towers exported for and through ORT's fusion
    int8: bool = False                 # also int8 graphs, gated


def _is_bundle(path: str) -> bool:
    """A bundle written before the output marker: its manifest.json names the bundle's files."""
    return json_with_keys(os.path.join(path, MANIFEST), "format", "files")


BUNDLE = OutputKind("bundle", recognise=_is_bundle)


def export_bundle(source: str, out_dir: str, data_dir: str, opts: ExportOptions | None = None,
                  tokenizer: str | None = None, heads: tuple[int, int] | None = None,
                  overwrite: bool | None = None) -> Manifest:
    """Write the bundle of `source` to `out_dir` (replacing an earlier bundle only on success, and
    nothing else unless `overwrite`: `infra.outputs`); return its manifest. `source`: a run
    directory (its `opts.checkpoint`), or published Chinese-CLIP weights (`muge export
    --pretrained`: a hub name, a `transformers` directory or a cn_clip `.pt`, with `tokenizer` and
    `heads`), as `model.factory.load_model` reads them. A checkpoint is memory-mapped (one copy of
    the weights); published weights are built in memory, and nothing but the bundle is written
    (the tokenizer goes straight into its build directory)."""
    t0 = time.time()
    opts = opts or ExportOptions()
    sources = (*source_paths(source, opts.checkpoint), tokenizer, data_dir)
    with staged_dir(out_dir, BUNDLE, sources, overwrite) as tmp:
        loaded = load_model(source, opts.checkpoint, tokenizer, heads)
        origin = {"checkpoint": None, "sha256": None, "epoch": 0, "valid_metrics": None, **loaded.origin}
        manifest = _build_bundle(loaded, {f"source_{key}": value for key, value in origin.items()}, tmp, data_dir,
                                 opts)
    log.info("bundle %s written in %.1fs", out_dir, time.time() - t0)
    return manifest


def _build_bundle(loaded: LoadedModel, source: dict, tmp: str, data_dir: str, opts: ExportOptions) -> Manifest:
    """The bundle of `loaded.model` (its weights are released tower by tower as their graphs are
    written), built in the directory `tmp`, where the tokenizer is saved; returns once every graph
    passes its checks and the parity gate (a ParityError otherwise).

    Memory: one copy of the weights; each tower's PyTorch reference for the gate is computed, its
    graph written, and its weights freed before the next tower; the gate then opens one graph at
    a time."""
    model, data = loaded.model, loaded.preprocessing
    queries_path, tsv_path = split_files(data_dir, "valid")
    tokenizer = loaded.save_tokenizer(tmp)
    check_tokenizer(tokenizer, model.text_vocab_rows, [q.text for q in read_queries(queries_path)[:2000]],
                    loaded.tokenizer_label, exact=model.exact_vocabulary)
    inputs = gate_inputs(queries_path, tsv_path, opts.settings, data.image_size, data.resize_rule)
    manifest = Manifest(family=model.family, embed_dim=0, image_size=data.image_size,
                        resize_rule=data.resize_rule, max_text_length=data.max_text_length,
                        text_normalization=data.text_normalization,
                        inverse_temperature=float(model.logit_scale.detach().exp()), files={}, opset=opts.opset,
                        exporter=opts.exporter, **source, libraries=_versions())
    reference = _export_towers(model, tmp, inputs, tokenizer, opts, manifest)
    del model
    free_memory()
    _record_files(tmp, manifest, GRAPHS + (INT8_GRAPHS if opts.int8 else ()))
    write_manifest(tmp, manifest)  # the gate runs the bundle as predict will
    log.info("parity gate on %s ...", data_dir)
    report = check_bundle(reference, tmp, inputs, settings=opts.settings, limits=opts.limits, device=opts.device)
    log.log(logging.INFO if report.passed else logging.ERROR, "%s", report.render())
    if not report.passed:
        raise ParityError(report)
    manifest.parity = report.to_dict()
    write_manifest(tmp, manifest)
    return manifest


def _export_towers(model, tmp: str, inputs, tokenizer, opts: ExportOptions, manifest: Manifest) -> dict:
    """Each tower in turn: its PyTorch reference embeddings for the gate, its fp32 graph (then its
    torch weights are released), its fp16 and, with `--int8`, its int8 twin. Records how each was
    exported in `manifest`; returns the references."""
    size = manifest.image_size
    examples = {"text": (torch.randint(5, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)),
                "image": (torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8),)}
    plans = prepare_fusion(model, opts.fused)
    reference = {}
    for kind in ("text", "image"):
        log.info("parity gate: PyTorch %s reference on %d %s ...", kind,
                 *((len(inputs.texts), "queries") if kind == "text" else (len(inputs.ids), "images")))
        reference[kind] = torch_embeddings(model, kind, inputs, tokenizer, opts.settings.batch_size)
        path = os.path.join(tmp, f"{kind}.onnx")
        manifest.graph_exports[kind], manifest.fusion[kind] = export_tower(
            model, kind, path, examples[kind], plans[kind], opset=opts.opset, exporter=opts.exporter, release=True)
        to_fp16(path, os.path.join(tmp, f"{kind}.fp16.onnx"))
        if opts.int8:
            to_int8(path, os.path.join(tmp, f"{kind}.int8.onnx"))
    manifest.embed_dim = int(reference["text"].shape[1])
    return reference


def _record_files(tmp: str, manifest: Manifest, graphs: tuple[str, ...]) -> None:
    """Check every graph, then hash it and its external-data files into the manifest."""
    for name in graphs:
        check_graph(os.path.join(tmp, name))
        data = [os.path.basename(p) for p in graph_files(os.path.join(tmp, name))[1:]]
        if data:
            manifest.external_data[name] = data
        for file in (name, *data):
            manifest.files[file] = sha256(os.path.join(tmp, file))
