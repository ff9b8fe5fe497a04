"""The two graphs of a bundle, exported from a trained model with dynamic batch (and sequence) axes.

text:  input_ids int64 [batch, seq], attention_mask int64 [batch, seq] -> text_embeds f32 [batch, dim]
image: pixels uint8 [batch, height, width, 3] -> image_embeds f32 [batch, dim]
The image graph starts with the cast, scaling, mean/std and transpose (`PixelNormalize`), so a
host only decodes and resizes (`competition.preprocess.resize_image`).

On disk a graph is one `.onnx` file while its tensors fit one protobuf message (which cannot
reach 2 GiB: ViT-H/14's fp32 image tower is 2.5 GB). A larger graph is written with ONNX
external data: the graph in `NAME.onnx`, every tensor in one `NAME.onnx.data` beside it
(`save_graph`). Every step that writes a graph (export, fusion, fp16, int8) goes through
`save_graph`, so each works on either layout.
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
# protobuf serialises no message of 2 GiB or more; a graph whose tensors pass this many bytes
# keeps them in an external-data file (the margin is for the nodes). Tests lower it.
MAX_SINGLE_FILE_BYTES = 2**31 - 2**27
DATA_SUFFIX = ".data"  # text.onnx -> text.onnx.data


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
    """(model in eval mode, checkpoint dict less its weights, checkpoint path) rebuilt offline
    from the run."""
    from train.checkpoint import checkpoint_path, load_checkpoint, load_weights
    from train.model import build_from_arch

    path = checkpoint_path(run_dir, checkpoint)
    ckpt = load_checkpoint(path, mmap=True)
    model = build_from_arch(ckpt["arch"], path)
    # the model takes the file's (memory-mapped) tensors as they are: no second copy of the weights
    load_weights(model, ckpt.pop("model"), path, assign=True)
    return model.eval(), ckpt, path


def free_memory() -> None:
    """Collect garbage and hand freed heap back to the system (glibc's `malloc_trim`): a tower's
    weights and graphs are freed in many blocks below glibc's mmap threshold, which would stay in
    the process, so the peak resident set would be the sum of the stages instead of the largest."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def tensor_bytes(model) -> int:
    """Bytes of the graph's tensors (initializers and Constant nodes' values), loaded or not."""
    from onnx.external_data_helper import _get_all_tensors

    total = 0
    for tensor in _get_all_tensors(model):
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            info = {e.key: e.value for e in tensor.external_data}
            total += int(info.get("length", 0)) or sum(len(x) for x in (tensor.float_data, tensor.int64_data,
                                                                     tensor.int32_data, tensor.double_data))
    return total


def over_limit(model) -> bool:
    """Whether the graph's tensors are too large for one protobuf file (`MAX_SINGLE_FILE_BYTES`)."""
    return tensor_bytes(model) > MAX_SINGLE_FILE_BYTES


def save_graph(model, path: str) -> list[str]:
    """Write `model` (a ModelProto with its tensors loaded) at `path`: one file while its tensors
    fit `MAX_SINGLE_FILE_BYTES`, else the graph with its tensors in `path + DATA_SUFFIX`. Returns
    the paths written; a data file of an earlier graph at `path` is removed."""
    import onnx

    data = path + DATA_SUFFIX
    for old in (path, data):
        if os.path.exists(old):
            os.remove(old)
    if not over_limit(model):
        onnx.save_model(model, path)
        return [path]
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(data), size_threshold=1024)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(data, 0o666 & ~umask)  # onnx creates it private; it is read as the graph beside it is
    return [path, data]


def graph_files(path: str) -> list[str]:
    """The files of the graph at `path`: itself, and its external-data file when it has one."""
    return [path] + ([path + DATA_SUFFIX] if os.path.isfile(path + DATA_SUFFIX) else [])


def is_large(path: str) -> bool:
    """Whether the graph at `path` keeps its tensors in external data."""
    return len(graph_files(path)) > 1


def graph_bytes(path: str) -> int:
    return sum(os.path.getsize(p) for p in graph_files(path))


def relocate(src: str, dst: str) -> list[str]:
    """Read the graph another tool wrote at `src` (in any external-data layout) and write it at
    `dst` with `save_graph`; `src`'s files are left to the caller."""
    import onnx

    model = onnx.load(src, load_external_data=True)
    return save_graph(model, dst)


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
    node) go to DEBUG; one INFO line says what was converted. A source over the protobuf limit is
    given to the converter as a path (its shape inference then runs on the file)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    with captured_logs("onnxruntime.transformers") as notes:
        source = src if is_large(src) else onnx.load(src)
        model = convert_float_to_float16(source, keep_io_types=True, disable_shape_infer=False)
        del source
        wrapped = OnnxModel(model)
        wrapped.topological_sort()  # the converter appends its Cast nodes after their consumers
    for record in notes:
        log.debug("fp16 converter: %s", record.getMessage())
    save_graph(wrapped.model, dst)
    nodes = len(wrapped.model.graph.node)
    del model, wrapped
    free_memory()
    log.info("%s -> %s (%d nodes, %.0f MiB; %d converter notes, shown with -v)", os.path.basename(src),
             os.path.basename(dst), nodes, graph_bytes(dst) / 2**20, len(notes))
    return dst


def check_graph(path: str) -> None:
    """onnx's full check; given the path, it reads a graph over the protobuf limit too."""
    import onnx

    onnx.checker.check_model(path, full_check=True)
