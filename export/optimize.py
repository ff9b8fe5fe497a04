"""Graph optimisation for the bundle: ONNX Runtime's transformer fusion, and int8 for CPU.

Fusion. ORT's transformer optimizer rewrites a transformer tower's subgraphs into its fused
kernels (Attention, SkipLayerNormalization, BiasGelu / QuickGelu, EmbedLayerNormalization). It
recognises the patterns of the TorchScript exporter's graph of a model built with eager
attention; a graph of torch's SDPA (either exporter) or of the dynamo exporter fuses nothing.
So a transformer tower is exported that way (`TRANSFORMER_EXPORT`) and then fused:
- a BERT-like text tower (a BERT's, or Chinese-CLIP's RoBERTa): model type `bert`;
- a CLIP ViT vision tower (Chinese-CLIP's): model type `clip`.
A timm image tower (convnext, resnet, ...) has no such pattern and is shipped as exported.
The fused-op counts go into the manifest; the fused graph is what the gate checks and what
ships, and the fp16 graph is made from it.

int8 (`muge export --int8`). Dynamic quantization (`quantize_dynamic`): int8 weights, per-tensor
scales, activations quantized per call; MatMul / Gemm / Attention nodes only, so every fused
op stays. Gated like fp16 (ranking and recall; `ParityLimits.int8`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile

from .files import graph_bytes, over_limit, relocate, save_graph
from .fp16 import captured_logs
from .graphs import export_graph
from .memory import free_memory

log = logging.getLogger(__name__)
TRANSFORMER_EXPORT = {"exporter": "torchscript", "opset": 17}
OPTIMIZER_LOGGERS = ("onnx_model", "onnx_model_bert", "onnx_model_clip", "fusion_utils", "fusion_base")
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu",
             "FastGelu", "QuickGelu", "Gelu", "LayerNormalization")


def prepare_fusion(model, fused: bool = True) -> dict:
    """{kind: fusion plan or None} for both towers: the tower's shape ({model_type, num_heads,
    hidden_size, layers}; the family's `tower_shape`) where it is a transformer ONNX Runtime
    fuses. Where any tower will be fused, `model` is switched to eager attention first (the
    pattern the optimizer recognises)."""
    plans = {kind: model.tower_shape(kind) if fused else None for kind in ("text", "image")}
    if any(plans.values()):
        eager_attention(model)
    return plans


def export_tower(model, kind: str, path: str, example: tuple, plan: dict | None, *, opset: int = 18,
                 exporter: str = "dynamo", release: bool = False) -> tuple[str, dict]:
    """Export one tower as a bundle ships it, at `path` (`save_graph`'s layout): a tower with a
    fusion `plan` through `TRANSFORMER_EXPORT` and `fuse`, any other with `exporter` / `opset`.
    `release`: free the torch tower's weights once the exporter has written its graph. Returns
    (how it was exported, the fused-op counts)."""
    how = TRANSFORMER_EXPORT if plan else {"exporter": exporter, "opset": opset}
    log.info("exporting the %s encoder (%s, opset %d) ...", kind, how["exporter"], how["opset"])
    staging = tempfile.mkdtemp(prefix=f".{kind}-export-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        raw = os.path.join(staging, "graph.onnx")
        export_graph(model, kind, raw, example, how["opset"], how["exporter"])
        if release:
            model.release_tower(kind)
        free_memory()
        counts = fuse(raw, path, plan) if plan else {}
        if not plan:
            relocate(raw, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        free_memory()
    return f"{how['exporter']}, opset {how['opset']}", counts


def attention_nodes(counts: dict) -> int:
    return counts.get("Attention", 0) + counts.get("MultiHeadAttention", 0)


@contextlib.contextmanager
def _working_dir(path: str):
    saved = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(saved)


def fuse(src: str, dst: str, plan: dict) -> dict:
    """Fuse the graph at `src` into `dst` (`save_graph`); returns the fused-op counts (zeros left
    out). The optimizer works on the graph with its weights left on disk: its shape inference
    copies (and serialises) the whole model once per fusion pass, which at ViT-H/14's 2.5 GB image
    tower took 18 GB and cannot serialise a graph over 2 GiB. The few weights a fusion rewrites
    (q, k, v into one projection) are read from the data file, relative to the working directory;
    every other weight is loaded back before the fused graph is written."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_model
    from onnxruntime.transformers.optimizer import optimize_model

    folder = os.path.dirname(os.path.abspath(src))
    weightless = os.path.join(folder, "weightless.onnx")
    model = onnx.load(src)
    onnx.save_model(model, weightless, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weightless.onnx.data", size_threshold=1024)
    del model
    free_memory()
    with contextlib.ExitStack() as quiet, _working_dir(folder):
        for name in OPTIMIZER_LOGGERS:  # the optimizer's per-step notes; its result is logged below
            quiet.enter_context(captured_logs(name))
        optimized = optimize_model(onnx.load(weightless, load_external_data=False), model_type=plan["model_type"],
                                   num_heads=plan["num_heads"], hidden_size=plan["hidden_size"], opt_level=0)
        counts = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v and k in FUSED_OPS}
        optimized.topological_sort()
        fused = optimized.model
        del optimized
        load_external_data_for_model(fused, folder)
    for tensor in _get_all_tensors(fused):  # as a graph that never had external data: the field unset
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.DEFAULT:
            tensor.ClearField("data_location")
    save_graph(_with_ms_opset(fused), dst)
    del fused
    free_memory()
    attention = attention_nodes(counts)
    level = logging.INFO if attention == plan["layers"] else logging.WARNING
    log.log(level, "%s: fused %s (%d attention nodes for %d layers)", os.path.basename(dst),
            ", ".join(f"{v} {k}" for k, v in counts.items()) or "nothing", attention, plan["layers"])
    return counts


def _with_ms_opset(model):
    """The fused graph's contrib ops need the com.microsoft opset declared (as ORT's own save adds)."""
    if any(n.domain == "com.microsoft" for n in model.graph.node) and \
            not any(o.domain == "com.microsoft" for o in model.opset_import):
        opset = model.opset_import.add()
        opset.domain, opset.version = "com.microsoft", 1
    return model


def to_int8(src: str, dst: str) -> str:
    """Dynamic int8 quantization of `src`'s MatMul / Gemm / Attention weights into `dst`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the quantizer re-infers every shape; the dynamo exporter's own value_info (symbolic batch
    # dims) can contradict that inference, so the copy it reads carries none
    model = onnx.load(src)
    del model.graph.value_info[:]
    plain, out = dst + ".in.onnx", dst + ".out.onnx"
    large = over_limit(model)
    save_graph(model, plain)
    del model
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a line per tensor to the root logger, and advice
    try:
        # a source over the protobuf limit is quantized with external data, then written in our layout
        quantize_dynamic(plain, out if large else dst, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm", "Attention"], use_external_data_format=large,
                         # the fused graph's contrib ops carry no type information for the quantizer
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        if large:
            relocate(out, dst)
    finally:
        free_memory()
        root.setLevel(level)
        for leftover in os.listdir(os.path.dirname(os.path.abspath(dst))):
            if leftover.startswith((os.path.basename(plain), os.path.basename(out))):
                os.remove(os.path.join(os.path.dirname(os.path.abspath(dst)), leftover))
    log.info("%s -> %s (int8 weights, %.0f -> %.0f MiB)", os.path.basename(src), os.path.basename(dst),
             graph_bytes(src) / 2**20, graph_bytes(dst) / 2**20)
    return dst


def eager_attention(model) -> None:
    """Switch every Hugging Face tower of `model` to eager attention (same weights, same outputs
    up to float rounding): the pattern ORT's optimizer fuses."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            if hasattr(module, "set_attn_implementation"):
                module.set_attn_implementation("eager")
            else:  # transformers before set_attn_implementation: the config field it sets
                module.config._attn_implementation = "eager"
