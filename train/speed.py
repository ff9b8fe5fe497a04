"""How a model trains fast on its device: backend flags, channels-last weights, torch.compile.

- TF32 matmuls/convolutions and cuDNN autotuning on CUDA. Every training shape is fixed (full
  batches, text padded to `max_text_length` when compiled), so cuDNN searches once per shape.
- Channels-last weights on CUDA: convolutions then run NHWC kernels. The input already is
  channels-last: `PixelNormalize` permutes the NHWC uint8 batch into an NCHW view of it.
- `torch.compile` of the model in place (`nn.Module.compile`): the state_dict keys, DDP wrapping,
  `no_sync`, gradient caching and checkpoints are the same as eager. Only `forward` (the training
  call) is compiled; evaluation's `encode_image` / `encode_text` run eager.
"""
from __future__ import annotations

import torch
from torch import nn


def compile_enabled(requested: bool | None, device: torch.device) -> bool:
    """`train.compile`: None (the default) compiles on CUDA only; CPU compile is slow to start and
    seldom pays for small models."""
    return device.type == "cuda" if requested is None else bool(requested)


def configure_backends(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def optimize_model(model: nn.Module, device: torch.device, compile: bool) -> nn.Module:
    """Channels-last on CUDA, then compile in place when asked. Returns the same module."""
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if compile:
        compile_model(model)
    return model


def compile_model(model: nn.Module) -> None:
    model.compile(dynamic=False)  # one static graph: training shapes never change


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing marks); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
