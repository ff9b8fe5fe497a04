"""Graph optimisation for the bundle: ONNX Runtime's transformer fusion, and int8 for CPU.

Fusion. ORT's transformer optimizer rewrites a transformer tower's subgraphs into its fused
kernels (Attention, SkipLayerNormalization, BiasGelu / QuickGelu, EmbedLayerNormalization). It
recognises the patterns of the TorchScript exporter's graph of a model built with eager
attention; a graph of torch's SDPA (either exporter) or of the dynamo exporter fuses nothing.
So a transformer tower is exported that way (`TRANSFORMER_EXPORT`) and then fused:
- the dual family's text tower (BERT-like) and Chinese-CLIP's text tower: model type `bert`;
- Chinese-CLIP's vision tower (a CLIP ViT): model type `clip`.
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

from .graphs import captured_logs, export_graph

log = logging.getLogger(__name__)
TRANSFORMER_EXPORT = {"exporter": "torchscript", "opset": 17}
OPTIMIZER_LOGGERS = ("onnx_model", "onnx_model_bert", "onnx_model_clip", "fusion_utils", "fusion_base")
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu",
             "FastGelu", "QuickGelu", "Gelu", "LayerNormalization")


def fusion_plan(arch: dict, kind: str) -> dict | None:
    """{model_type, num_heads, hidden_size, layers} for a transformer tower; None for one that has
    no pattern to fuse (a timm CNN)."""
    if arch["family"] == "chinese-clip":
        key, model_type = ("text_config", "bert") if kind == "text" else ("vision_config", "clip")
        conf = arch["clip_config"][key]
    elif kind == "text" and arch.get("text_model_type") in ("bert", "roberta"):
        conf, model_type = arch["text_config"], "bert"
    else:
        return None
    return {"model_type": model_type, "num_heads": int(conf["num_attention_heads"]),
            "hidden_size": int(conf["hidden_size"]), "layers": int(conf["num_hidden_layers"])}


def prepare_fusion(model, arch: dict, fused: bool = True) -> dict:
    """{kind: fusion plan or None} for both towers; where any tower will be fused, `model` is
    switched to eager attention first (the pattern the optimizer recognises)."""
    plans = {kind: fusion_plan(arch, kind) if fused else None for kind in ("text", "image")}
    if any(plans.values()):
        eager_attention(model)
    return plans


def export_tower(model, kind: str, path: str, example: tuple, plan: dict | None, *, opset: int = 18,
                 exporter: str = "dynamo") -> tuple[str, dict]:
    """Export one tower as a bundle ships it: a tower with a fusion `plan` through
    `TRANSFORMER_EXPORT` and `fuse`, any other with `exporter` / `opset`. Returns (how it was
    exported, the fused-op counts)."""
    how = TRANSFORMER_EXPORT if plan else {"exporter": exporter, "opset": opset}
    log.info("exporting the %s encoder (%s, opset %d) ...", kind, how["exporter"], how["opset"])
    export_graph(model, kind, path, example, how["opset"], how["exporter"])
    return f"{how['exporter']}, opset {how['opset']}", fuse(path, plan) if plan else {}


def attention_nodes(counts: dict) -> int:
    return counts.get("Attention", 0) + counts.get("MultiHeadAttention", 0)


def fuse(path: str, plan: dict) -> dict:
    """Fuse the graph at `path` in place; returns the fused-op counts (zeros left out)."""
    from onnxruntime.transformers.optimizer import optimize_model

    with contextlib.ExitStack() as quiet:  # the optimizer's per-step notes; its result is logged below
        for name in OPTIMIZER_LOGGERS:
            quiet.enter_context(captured_logs(name))
        model = optimize_model(path, model_type=plan["model_type"], num_heads=plan["num_heads"],
                               hidden_size=plan["hidden_size"], opt_level=0)
        counts = {k: v for k, v in model.get_fused_operator_statistics().items() if v and k in FUSED_OPS}
        model.save_model_to_file(path)
    attention = attention_nodes(counts)
    level = logging.INFO if attention == plan["layers"] else logging.WARNING
    log.log(level, "%s: fused %s (%d attention nodes for %d layers)", os.path.basename(path),
            ", ".join(f"{v} {k}" for k, v in counts.items()) or "nothing", attention, plan["layers"])
    return counts


def to_int8(src: str, dst: str) -> str:
    """Dynamic int8 quantization of `src`'s MatMul / Gemm / Attention weights into `dst`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the quantizer re-infers every shape; the dynamo exporter's own value_info (symbolic batch
    # dims) can contradict that inference, so the copy it reads carries none
    model = onnx.load(src)
    del model.graph.value_info[:]
    plain = dst + ".in.onnx"
    onnx.save_model(model, plain)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a line per tensor to the root logger, and advice
    try:
        quantize_dynamic(plain, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm", "Attention"],
                         # the fused graph's contrib ops carry no type information for the quantizer
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)
        os.remove(plain)
    log.info("%s -> %s (int8 weights, %.0f -> %.0f MiB)", os.path.basename(src), os.path.basename(dst),
             os.path.getsize(src) / 2**20, os.path.getsize(dst) / 2**20)
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
