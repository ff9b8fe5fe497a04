"""The two graphs of a bundle, exported from a trained model with dynamic batch (and sequence) axes.

text:  input_ids int64 [batch, seq], attention_mask int64 [batch, seq] -> text_embeds f32 [batch, dim]
image: pixels uint8 [batch, height, width, 3] -> image_embeds f32 [batch, dim]
The image graph starts with the cast, scaling, mean/std and transpose (`PixelNormalize`), so a
host only decodes and resizes (`competition.preprocess.resize_image`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch
from torch import nn

log = logging.getLogger(__name__)
TEXT_INPUTS, TEXT_OUTPUT = ("input_ids", "attention_mask"), "text_embeds"
IMAGE_INPUT, IMAGE_OUTPUT = "pixels", "image_embeds"


class TextGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.encode_text(input_ids, attention_mask)


class ImageGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model.encode_image(pixels)


def load_run_model(run_dir: str, checkpoint: str = "best"):
    """(model in eval mode, checkpoint dict, checkpoint path) rebuilt offline from the run."""
    from train.checkpoint import checkpoint_path, load_checkpoint, load_weights
    from train.model import build_from_arch

    path = checkpoint_path(run_dir, checkpoint)
    ckpt = load_checkpoint(path)
    model = build_from_arch(ckpt["arch"], path)
    load_weights(model, ckpt["model"], path)
    return model.eval(), ckpt, path


def _single_file(path: str) -> None:
    """Fold any external-data files back into the graph (bundles are self-contained, < 2 GB)."""
    import onnx

    model = onnx.load(path, load_external_data=True)
    onnx.save_model(model, path, save_as_external_data=False)
    folder, base = os.path.split(path)
    for name in os.listdir(folder):  # e.g. text.onnx.data, now folded in
        if name.startswith(base) and name != base:
            os.remove(os.path.join(folder, name))


def export_graph(model, kind: str, path: str, example: tuple, opset: int = 18, exporter: str = "dynamo") -> str:
    """Export the text or image encoder of `model` to `path` (fp32) with dynamic axes."""
    graph = (TextGraph(model) if kind == "text" else ImageGraph(model)).eval()
    if kind == "text":
        names, output = list(TEXT_INPUTS), TEXT_OUTPUT
        axes = {n: {0: "batch", 1: "seq"} for n in names}
    else:
        names, output = [IMAGE_INPUT], IMAGE_OUTPUT
        axes = {IMAGE_INPUT: {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1)
            shapes = {n: ({0: batch, 1: seq} if kind == "text" else {0: batch}) for n in names}
            torch.onnx.export(graph, example, path, input_names=names, output_names=[output], dynamic_shapes=shapes,
                              dynamo=True, opset_version=opset, verbose=False)
        elif exporter == "torchscript":
            torch.onnx.export(graph, example, path, input_names=names, output_names=[output],
                              dynamic_axes={**axes, output: {0: "batch"}}, dynamo=False, opset_version=opset)
        else:
            raise ValueError(f"unknown exporter {exporter!r}; expected dynamo or torchscript")
    _single_file(path)
    return path


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def captured_logs(name: str):
    """The records of logger `name` (and its children), kept from the console."""
    logger, handler = logging.getLogger(name), _Records()
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def to_fp16(src: str, dst: str) -> str:
    """fp16 weights and compute, fp32 (and uint8/int64) inputs and outputs kept as they are.
    The converter's notes (one per initializer shared by fp32 and fp16 nodes, each listing every
    node) go to DEBUG; one INFO line says what was converted."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    with captured_logs("onnxruntime.transformers") as notes:
        model = convert_float_to_float16(onnx.load(src), keep_io_types=True, disable_shape_infer=False)
        wrapped = OnnxModel(model)
        wrapped.topological_sort()  # the converter appends its Cast nodes after their consumers
    for record in notes:
        log.debug("fp16 converter: %s", record.getMessage())
    onnx.save_model(wrapped.model, dst)
    log.info("%s -> %s (%d nodes; %d converter notes, shown with -v)", os.path.basename(src), os.path.basename(dst),
             len(wrapped.model.graph.node), len(notes))
    return dst


def check_graph(path: str) -> None:
    import onnx

    onnx.checker.check_model(path, full_check=True)
