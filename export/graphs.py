"""The two graphs of a bundle, exported from a trained model with dynamic batch (and sequence) axes.

text:  input_ids int64 [batch, seq], attention_mask int64 [batch, seq] -> text_embeds f32 [batch, dim]
image: pixels uint8 [batch, height, width, 3] -> image_embeds f32 [batch, dim]
The image graph starts with the cast, scaling, mean/std and transpose (`PixelNormalize`), so a
host only decodes and resizes (`competition.preprocess.resize_image`). How a graph lies on disk
is `export.files`'s.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

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


def export_graph(model, kind: str, path: str, example: tuple, opset: int = 18, exporter: str = "dynamo") -> str:
    """Export the text or image encoder of `model` to `path` (fp32) with dynamic axes, in the
    exporter's own layout: a large graph's tensors go where it puts them (TorchScript's: one file
    each, beside the graph), so `path` is in a folder of its own (`export.optimize.export_tower`
    moves the graph out of it with `save_graph`)."""
    graph = (TextGraph(model) if kind == "text" else ImageGraph(model)).eval()
    _export(graph, kind, example, path, opset, exporter)
    return path


def _export(graph, kind: str, example: tuple, path: str, opset: int, exporter: str) -> None:
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
