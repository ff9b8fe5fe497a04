"""The pieces both families share: pixel normalisation inside the graph, text pooling, projection
heads and FLIP's patch masking.

Images enter as uint8 [batch, height, width, 3] (already resized by
`competition.preprocess.resize_image`); cast, scaling, mean/std and transpose happen in
`PixelNormalize`, so the exported ONNX graph contains them too.
"""
from __future__ import annotations

from typing import get_args

import torch
from torch import nn

from .config import Head, Pooling

POOLINGS = get_args(Pooling)  # the config schema names the choices; the model implements each
HEADS = get_args(Head)
# `train.lora.targets` in a BERT (or RoBERTa) tower, by name suffix: its attention's query and value, every
# attention projection (the output's `attention.output.dense`), every Linear layer (the MLP's `dense` too)
BERT_LORA_TARGETS = {"qv": ["query", "value"], "attention": ["query", "key", "value", "attention.output.dense"],
                     "all-linear": ["query", "key", "value", "dense"]}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PixelNormalize(nn.Module):
    """uint8 NHWC -> normalised float NCHW."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.permute(0, 3, 1, 2).float() * self.scale - self.shift


class TextPool(nn.Module):
    def __init__(self, kind: str, width: int):
        super().__init__()
        if kind not in POOLINGS:
            raise ValueError(f"unknown text pooling {kind!r}; expected one of {', '.join(POOLINGS)}")
        self.kind = kind
        self.out_dim = 2 * width if kind == "mean_max" else width
        if kind == "attentive":
            self.score = nn.Linear(width, 1)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        if self.kind == "attentive":
            logits = self.score(hidden).masked_fill(m == 0, torch.finfo(hidden.dtype).min)
            return (logits.softmax(dim=1) * hidden).sum(dim=1)
        mean = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        if self.kind == "mean":
            return mean
        peak = hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
        return torch.cat([mean, peak], dim=-1)


def projection_head(kind: str, in_dim: int, out_dim: int, dropout: float) -> nn.Module:
    if kind not in HEADS:
        raise ValueError(f"unknown projection head {kind!r}; expected one of {', '.join(HEADS)}")
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.LayerNorm(in_dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(in_dim, out_dim))


def random_masking(tokens: torch.Tensor, ratio: float) -> torch.Tensor:
    """FLIP: keep the class token and a random `int((L - 1) * (1 - ratio))` of the patch tokens of
    each image, drawn exactly as Chinese-CLIP draws them (cn_clip/clip/model.py
    `VisualTransformer.random_masking`: `torch.rand` noise on the tokens' device, argsort, the first
    ones kept, in that order)."""
    n, length, dim = tokens.shape
    keep = int((length - 1) * (1 - ratio))
    noise = torch.rand(n, length - 1, device=tokens.device)
    ids = torch.argsort(noise, dim=1)[:, :keep] + 1
    kept = torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, dim))
    return torch.cat([tokens[:, :1], kept], dim=1)
