"""fp16 twins of the fp32 graphs: ONNX Runtime's converter, its notes kept from the console."""
from __future__ import annotations

import contextlib
import logging
import os

from .files import graph_bytes, is_large, save_graph
from .memory import free_memory

log = logging.getLogger(__name__)


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
