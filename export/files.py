"""A graph on disk. It is one `.onnx` file while its tensors fit one protobuf message (which
cannot reach 2 GiB: ViT-H/14's fp32 image tower is 2.5 GB). A larger graph is written with ONNX
external data: the graph in `NAME.onnx`, every tensor in one `NAME.onnx.data` beside it
(`save_graph`). Every step that writes a graph (export, fusion, fp16, int8) goes through
`save_graph`, so each works on either layout.
"""
from __future__ import annotations

import os

# protobuf serialises no message of 2 GiB or more; a graph whose tensors pass this many bytes
# keeps them in an external-data file (the margin is for the nodes). Tests lower it.
MAX_SINGLE_FILE_BYTES = 2**31 - 2**27
DATA_SUFFIX = ".data"  # text.onnx -> text.onnx.data


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


def check_graph(path: str) -> None:
    """onnx's full check; given the path, it reads a graph over the protobuf limit too."""
    import onnx

    onnx.checker.check_model(path, full_check=True)
