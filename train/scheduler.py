"""Linear warmup, then cosine decay to a floor (a fraction of each group's own lr)."""
from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def create_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                     min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, min_lr_ratio))
