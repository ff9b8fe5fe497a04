"""ONNX Runtime sessions for a bundle: CUDA + fp16 graphs when a GPU is present, CPU + fp32
otherwise. Needs only onnxruntime, numpy and `competition` (no torch).

onnxruntime-gpu lists the CUDA provider even on machines without a GPU and logs errors when
asked to use it, so the GPU is probed through the driver (libcuda) first.

Each session sees a small fixed set of input shapes: the image graph one batch shape (a short
batch is padded with black images and their outputs dropped), the text graph one batch size and
a few padded lengths (`text_lengths`). The CUDA provider plans (and cuDNN searches its
convolution algorithms) once per new shape, which costs seconds; with fixed shapes that happens
once, in `warmup`, instead of on every tail batch.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from competition import MugeDataError
from competition.preprocess import TextTokenizer, directory_tokenizer
from competition.topk import NonFiniteError, first_nonfinite_row
from infra.io import atomic_write_text, sha256

from .manifest import MANIFEST, BundleError, Manifest, is_plain_file_name, read_manifest

log = logging.getLogger(__name__)
# Images per graph call. Measured with `muge bench gpu` (README): on an H100 the fp16 graphs of
# convnext_tiny and ViT-B/16 gain little past 128 while decode keeps up; on a CPU 64.
DEFAULT_BATCH = {"cuda": 128, "cpu": 64}
TEXT_BATCH = 256


def cuda_device_count() -> int:
    """GPUs visible through the CUDA driver; 0 when there is no driver or no device."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        if lib.cuInit(0) != 0:
            return 0
        count = ctypes.c_int(0)
        return count.value if lib.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0
    except OSError:
        return 0


SUFFIXES = {"fp32": ".onnx", "fp16": ".fp16.onnx", "int8": ".int8.onnx"}  # text.onnx, text.fp16.onnx, ...


def has_graphs(manifest: Manifest, precision: str) -> bool:
    """Whether a bundle holds the graphs of `precision` (int8 only with `muge export --int8`)."""
    return f"text{SUFFIXES[precision]}" in manifest.files


@dataclass(frozen=True)
class RuntimeChoice:
    providers: tuple[str, ...]
    fp16: bool
    int8: bool = False

    @property
    def device(self) -> str:
        return "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    @property
    def precision(self) -> str:
        return "int8" if self.int8 else "fp16" if self.fp16 else "fp32"

    @property
    def suffix(self) -> str:
        return SUFFIXES[self.precision]


def choose_runtime(device: str = "auto", precision: str = "auto") -> RuntimeChoice:
    """device: auto | cuda | cpu; precision: auto | fp16 | fp32 | int8 (auto: fp16 on CUDA, fp32 on
    CPU, where ORT's fp16 kernels are slower than fp32; int8, from `muge export --int8`, on CPU only)."""
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers() and cuda_device_count() > 0
    if device == "cuda" and not has_cuda:
        raise RuntimeError("--device cuda: no CUDA GPU (or no CUDA provider in onnxruntime) on this machine")
    if precision == "int8":
        if device == "cuda":
            raise RuntimeError("--precision int8 runs on the CPU (dynamic int8 kernels); drop --device cuda")
        return RuntimeChoice(("CPUExecutionProvider",), False, True)
    use_cuda = has_cuda if device == "auto" else device == "cuda"
    fp16 = use_cuda if precision == "auto" else precision == "fp16"
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if use_cuda else ("CPUExecutionProvider",)
    return RuntimeChoice(providers, fp16)


def session(path: str, choice: RuntimeChoice, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: no provider-fallback chatter
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, opts, providers=list(choice.providers))


def _load_session(path: str, choice: RuntimeChoice, threads: int | None):
    try:
        return session(path, choice, threads)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise BundleError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]})") from None


def text_lengths(max_length: int, step: int = 16) -> tuple[int, ...]:
    """The padded lengths the text graph sees: multiples of `step`, and `max_length` itself."""
    return tuple(sorted({*range(step, max_length, step), max_length}))


VERIFIED = ".verified.json"  # files whose sha256 matched the manifest, by (inode, size, mtime, ctime)


def graph_data_files(path: str) -> list[str]:
    """The external-data files the graph's own tensors name (none for a graph in one file): what
    ONNX Runtime will open beside it, whatever the manifest says."""
    import mmap

    import onnx
    from onnx.external_data_helper import _get_all_tensors

    if os.path.getsize(path) == 0:
        return []  # ONNX Runtime refuses it, naming it
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as raw:
        if raw.find(b"location") < 0:  # no tensor names a file (the key every external tensor has): no parse
            return []
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, onnx's own
        raise BundleError(f"{path}: not an ONNX graph ({str(exc).splitlines()[0][:200]}); re-export the bundle") \
            from None
    return sorted({entry.value for tensor in _get_all_tensors(model)
                   if tensor.data_location == onnx.TensorProto.EXTERNAL
                   for entry in tensor.external_data if entry.key == "location"})


def verify_graph(bundle_dir: str, name: str, manifest: Manifest) -> str:
    """The graph's sha256, which must be the manifest's, and so must each external-data file's
    that its tensors name: a graph copied in from another export (or damaged) would otherwise
    give silently wrong embeddings, and reuse a stale cache. A data file must be a plain file
    inside the bundle (not a link to storage elsewhere, which ONNX Runtime refuses) and listed
    in the manifest; nothing outside the bundle is opened. Returns the digest caches are keyed
    by: the graph's sha256, combined with its data files' where it has any."""
    manifest_path = os.path.join(bundle_dir, MANIFEST)
    stamps = _read_stamps(bundle_dir)
    digest, data_files = _verified(bundle_dir, name, manifest, stamps, graph=True)
    for data in data_files:
        if not is_plain_file_name(data):
            raise BundleError(f"{os.path.join(bundle_dir, name)}: its tensors name external data {data!r}, which is "
                              "not a file inside the bundle; nothing outside a bundle is read (re-export the bundle)")
    listed = manifest.external_data.get(name, [])
    if sorted(listed) != data_files:
        raise BundleError(f"{manifest_path}: external_data lists {listed or 'no files'} for {name}, but its tensors "
                          f"are in {data_files or 'the graph itself'}: the manifest does not describe this graph "
                          "(re-export the bundle)")
    digests = [digest] + [_verified(bundle_dir, data, manifest, stamps)[0] for data in data_files]
    return digest if len(digests) == 1 else hashlib.sha256("|".join(digests).encode()).hexdigest()


def _read_stamps(bundle_dir: str) -> dict:
    try:
        with open(os.path.join(bundle_dir, VERIFIED), encoding="utf-8") as f:
            stamps = json.load(f)
    except (OSError, ValueError, RecursionError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _verified(bundle_dir: str, name: str, manifest: Manifest, stamps: dict, graph: bool = False):
    """(sha256, the external-data files it names if `graph`) of one file, its sha256 checked against
    the manifest's. Hashing (and reading the graph) is skipped while the file's inode, size, mtime
    and ctime are those of its last verification (`VERIFIED`, updated in place in `stamps`)."""
    path = os.path.join(bundle_dir, name)
    expected = manifest.files.get(name)
    if os.path.islink(path) and not graph:
        raise BundleError(f"{path} is a symbolic link (to {os.readlink(path)}): ONNX Runtime reads a graph's external "
                          f"data only from a file inside the bundle's directory; copy the file in: cp "
                          f"--remove-destination \"$(readlink -f {path})\" {path}")
    if not os.path.isfile(path):
        raise BundleError(f"{path} not found: the bundle is incomplete (re-export it)")
    if not expected:
        raise BundleError(f"{os.path.join(bundle_dir, MANIFEST)}: no sha256 for {name} in files (re-export the "
                          "bundle)")
    st = os.stat(path)
    stamp = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, expected]
    saved = stamps.get(name)
    if isinstance(saved, list) and saved[:5] == stamp and (not graph or len(saved) == 6 and isinstance(saved[5], list)):
        return expected, saved[5] if graph else []
    actual = sha256(path)
    if actual != expected:
        what = "graph" if graph else "external data"
        raise BundleError(f"{path}: its sha256 {actual[:16]}... is not the manifest's {expected[:16]}...: the "
                          f"{what} was altered, truncated or copied from another export; re-export the bundle")
    data_files = graph_data_files(path) if graph else []
    stamps[name] = stamp + ([data_files] if graph else [])
    try:
        atomic_write_text(os.path.join(bundle_dir, VERIFIED), json.dumps(stamps))
    except OSError:  # a read-only bundle is verified again next time
        pass
    return expected, data_files


def bundle_tokenizer(bundle_dir: str, manifest: Manifest) -> TextTokenizer:
    """The bundle's tokenizer with its length and text normalisation, as predict tokenizes."""
    try:
        return directory_tokenizer(bundle_dir, manifest.max_text_length, manifest.text_normalization)
    except MugeDataError as exc:
        raise BundleError(f"{exc}; re-export the bundle") from None
    except ValueError as exc:
        raise BundleError(f"{os.path.join(bundle_dir, MANIFEST)}: bad value ({exc})") from None


class BundleEncoders:
    """The bundle's two encoders behind numpy in / numpy out, at fixed input shapes.

    `batch_size`: images per image-graph call (default per device, `DEFAULT_BATCH`). Every call
    runs at exactly that batch; `text_batch` likewise for the text graph. `towers`: the graphs
    to load (the parity gate opens one at a time).
    """

    def __init__(self, bundle_dir: str, device: str = "auto", precision: str = "auto", threads: int | None = None,
                 choice: RuntimeChoice | None = None, batch_size: int | None = None, text_batch: int = TEXT_BATCH,
                 towers: tuple[str, ...] = ("text", "image")):
        self.bundle_dir = bundle_dir
        self.manifest = read_manifest(bundle_dir)
        self.choice = choice or choose_runtime(device, precision)
        self.text_graph, self.image_graph = "text" + self.choice.suffix, "image" + self.choice.suffix
        if self.choice.int8 and not has_graphs(self.manifest, "int8"):
            raise BundleError(f"{bundle_dir} has no int8 graphs: export it with `muge export --int8`, or predict "
                              "with another --precision")
        graphs = {"text": self.text_graph, "image": self.image_graph}
        # what is really loaded: caches are keyed by these hashes
        self.graph_hashes = {graphs[t]: verify_graph(bundle_dir, graphs[t], self.manifest) for t in towers}
        self.text, self.image = (_load_session(os.path.join(bundle_dir, graphs[t]), self.choice, threads)
                                 if t in towers else None for t in ("text", "image"))
        self.image_size, self.resize_rule = self.manifest.image_size, self.manifest.resize_rule
        self.dim = self.manifest.embed_dim
        self.tokenizer = bundle_tokenizer(bundle_dir, self.manifest)
        if self.image is not None:
            self._check_graph_inputs()
        self.batch_size = int(batch_size or DEFAULT_BATCH[self.choice.device])
        self.text_batch = int(text_batch)
        self.lengths = text_lengths(self.tokenizer.max_length)
        if self.batch_size < 1 or self.text_batch < 1:
            raise ValueError(f"batch sizes must be positive, got images {self.batch_size}, text {self.text_batch}")
        if self.text is not None:
            self._check_text_length()

    def _check_graph_inputs(self) -> None:
        """The image graph's pixels input must be the manifest's size: a manifest that says otherwise
        would feed the graph images it cannot take."""
        inputs = {i.name: i.shape for i in self.image.get_inputs()}
        shape = inputs.get("pixels")
        if shape is None or len(shape) != 4:
            raise BundleError(f"{os.path.join(self.bundle_dir, self.image_graph)}: no uint8 NHWC 'pixels' input; "
                              "not a muge image graph (re-export the bundle)")
        height, width = shape[1:3]
        for side in (height, width):
            if isinstance(side, int) and side != self.image_size:
                raise BundleError(f"{os.path.join(self.bundle_dir, MANIFEST)} says image_size {self.image_size}, "
                                  f"but {self.image_graph} takes {height}x{width} images: the manifest does not "
                                  "describe this graph (re-export the bundle)")

    def _check_text_length(self) -> None:
        """The text graph must take the manifest's `max_text_length` tokens (its model's positions
        bound it): one call at that length now, rather than an ONNX Runtime error at the first long
        query. One row on a CPU; on CUDA the padded batch `warmup` runs anyway."""
        length = self.tokenizer.max_length
        rows = self.text_batch if self.choice.device == "cuda" else 1
        ids = np.full((rows, length), self.tokenizer.pad_id, np.int64)
        try:
            self.text.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        except Exception as exc:  # ONNX Runtime's own exception types
            raise BundleError(f"{os.path.join(self.bundle_dir, MANIFEST)}: max_text_length={length}, but "
                              f"{self.text_graph} cannot take {length} tokens ({' '.join(str(exc).split())[:200]}); "
                              "re-export the bundle") from None

    def _run(self, session, graph: str, feeds: dict) -> np.ndarray:
        try:
            return session.run(None, feeds)[0]
        except Exception as exc:  # ONNX Runtime's own exception types
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
            raise BundleError(f"{os.path.join(self.bundle_dir, graph)}: ONNX Runtime failed on {shapes} "
                              f"({' '.join(str(exc).split())[:300]})") from None

    def describe(self) -> str:
        return f"{self.choice.device} ({self.choice.precision} graphs, image batch {self.batch_size})"

    def warmup(self) -> float:
        """Run every input shape once (on CUDA each new shape costs seconds); returns seconds."""
        t0 = time.perf_counter()
        if self.image is not None:
            self._run_images(np.zeros((self.batch_size, self.image_size, self.image_size, 3), np.uint8))
        empty = np.zeros((0, 0), np.int64)
        for length in self.lengths if self.text is not None else ():
            self._run_text(empty, empty, length)
        return time.perf_counter() - t0

    def _run_images(self, pixels: np.ndarray) -> np.ndarray:
        return self._run(self.image, self.image_graph, {"pixels": pixels}).astype(np.float32, copy=False)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [n, size, size, 3] -> float32 [n, dim], in graph calls of exactly `batch_size`."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        out = []
        for start in range(0, len(pixels), self.batch_size):
            part = pixels[start:start + self.batch_size]
            if len(part) < self.batch_size:  # pad with black images; their outputs are dropped
                pad = np.zeros((self.batch_size - len(part), *part.shape[1:]), np.uint8)
                part = np.concatenate([part, pad])
            out.append(self._run_images(part)[:min(self.batch_size, len(pixels) - start)])
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode_text(self, texts) -> np.ndarray:
        """texts -> float32 [n, dim], in graph calls of `text_batch` rows padded to one of `lengths`."""
        texts = list(texts)
        out = [self._run_text(*self.tokenizer(texts[start:start + self.text_batch]))
               for start in range(0, len(texts), self.text_batch)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def _run_text(self, ids: np.ndarray, mask: np.ndarray, length: int | None = None) -> np.ndarray:
        """One text-graph call of `text_batch` rows padded to `length` (default: the shortest of
        `lengths` that holds them); returns the given rows' embeddings."""
        n, have = ids.shape
        length = length or next(x for x in self.lengths if x >= have)
        full_ids = np.full((self.text_batch, length), self.tokenizer.pad_id, np.int64)
        full_mask = np.zeros((self.text_batch, length), np.int64)
        full_ids[:n, :have], full_mask[:n, :have] = ids, mask
        full_mask[n:, 0] = 1  # padding rows attend to one token: no all-masked row
        feats = self._run(self.text, self.text_graph, {"input_ids": full_ids, "attention_mask": full_mask})
        return feats[:n].astype(np.float32, copy=False)

    def require_finite(self, features: np.ndarray, kind: str, describe_row) -> None:
        """Refuse NaN/inf embeddings, naming the graph and the first bad item (`describe_row(i)`)."""
        row = first_nonfinite_row(features)
        if row is not None:
            graph = self.image_graph if kind == "image" else self.text_graph
            raise NonFiniteError(f"{os.path.join(self.bundle_dir, graph)} gave a non-finite embedding for "
                                 f"{describe_row(row)} (on {self.describe()}); nothing was written. The bundle is "
                                 "broken for this input: re-export it, or try --precision fp32")
