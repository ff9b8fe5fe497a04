"""ONNX Runtime sessions for a bundle: CUDA + fp16 graphs when a GPU is present, CPU + fp32
otherwise. Needs only onnxruntime, numpy and `competition` (no torch).

onnxruntime-gpu lists the CUDA provider even on machines without a GPU and logs errors when
asked to use it, so the GPU is probed through the driver (libcuda) first.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from competition.preprocess import TextTokenizer

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


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


@dataclass(frozen=True)
class RuntimeChoice:
    providers: tuple[str, ...]
    fp16: bool

    @property
    def device(self) -> str:
        return "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"


def choose_runtime(device: str = "auto", precision: str = "auto") -> RuntimeChoice:
    """device: auto | cuda | cpu; precision: auto | fp16 | fp32 (auto: fp16 on CUDA, fp32 on CPU,
    where ORT's fp16 kernels are slower than fp32)."""
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers() and cuda_device_count() > 0
    if device == "cuda" and not has_cuda:
        raise RuntimeError("--device cuda: no CUDA GPU (or no CUDA provider in onnxruntime) on this machine")
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


def read_manifest(bundle_dir: str) -> dict:
    path = os.path.join(bundle_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {bundle_dir} is not an export bundle (run `muge export`)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class BundleEncoders:
    """The bundle's two encoders behind numpy in / numpy out."""

    def __init__(self, bundle_dir: str, device: str = "auto", precision: str = "auto", threads: int | None = None,
                 choice: RuntimeChoice | None = None):
        self.bundle_dir = bundle_dir
        self.manifest = read_manifest(bundle_dir)
        self.choice = choice or choose_runtime(device, precision)
        suffix = ".fp16.onnx" if self.choice.fp16 else ".onnx"
        self.text = session(os.path.join(bundle_dir, "text" + suffix), self.choice, threads)
        self.image = session(os.path.join(bundle_dir, "image" + suffix), self.choice, threads)
        self.tokenizer = TextTokenizer(os.path.join(bundle_dir, "tokenizer"), self.manifest["max_text_length"])
        self.image_size = int(self.manifest["image_size"])
        self.resize_rule = self.manifest["resize_rule"]
        self.dim = int(self.manifest["embed_dim"])

    def describe(self) -> str:
        return f"{self.choice.device} ({'fp16' if self.choice.fp16 else 'fp32'} graphs)"

    def encode_text(self, texts) -> np.ndarray:
        ids, mask = self.tokenizer(list(texts))
        return self.text.run(None, {"input_ids": ids, "attention_mask": mask})[0].astype(np.float32, copy=False)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [batch, size, size, 3] -> float32 [batch, dim]."""
        return self.image.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.uint8)})[0].astype(
            np.float32, copy=False)
