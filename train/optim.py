"""`create_optimizer`: AdamW (fused on CUDA) with head / text / image parameter groups, layer-wise
lr decay inside each tower, and no weight decay on norms, biases and the logit scale. `apply_freeze`
trains only the top N blocks of each tower, and only the adapters of a tower with LoRA adapters."""
from __future__ import annotations

import logging

import torch
from torch import nn

from model.lora import ADAPTER

from .config import FreezeConfig, TrainConfig

log = logging.getLogger(__name__)


def lr_scale(layer_id: int, top: int, decay: float) -> float:
    """The final norm (top+1) trains at the group's lr, block `top` at lr*decay, ..., the
    stem/embeddings (0) at lr*decay**(top+1)."""
    return decay ** (top + 1 - layer_id)


def top_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each parameter group's rate now (head, text, image): its top layer trains at the group's
    base rate, and layer decay lowers the layers below it."""
    top: dict[str, float] = {}
    for group in optimizer.param_groups:
        name = group.get("group", "all")
        top[name] = max(top.get(name, 0.0), group["lr"])
    return top


def adapter_role(name: str) -> str:
    """A LoRA parameter's matrix, for its rate: "B", or "A" (DoRA's magnitudes train at A's rate);
    "" for any other parameter."""
    return "" if ADAPTER not in name else "B" if ".lora_B." in name else "A"


def create_optimizer(model: nn.Module, cfg: TrainConfig, loss: nn.Module | None = None) -> torch.optim.Optimizer:
    """Groups by tower, layer and decay: each at its tower's rate with layer decay; LoRA adapters at
    `train.lora.lr_ratio` times their layer's rate, their B matrices `b_lr_ratio` times more (LoRA+).
    The loss's own parameters (the sigmoid loss's bias) train with the heads, without decay."""
    base = {"head": cfg.lr.head, "text": cfg.lr.text, "image": cfg.lr.image}
    ratio = {"": 1.0, "A": cfg.lora.lr_ratio, "B": cfg.lora.lr_ratio * cfg.lora.b_lr_ratio}
    layout = model.param_layout()
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        group, layer, top = layout[name]
        role = adapter_role(name)
        scale = (1.0 if group == "head" else lr_scale(layer, top, cfg.layer_decay)) * ratio[role]
        no_decay = p.ndim <= 1  # norms, biases, the logit scale
        key = (group, layer, no_decay, role)
        g = groups.setdefault(key, {"params": [], "names": [], "lr": base[group] * scale, "lr_scale": scale,
                                    "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                                    "group": group, "layer": layer})
        g["params"].append(p)
        g["names"].append(name)
    for name, p in loss.named_parameters() if loss is not None else ():
        g = groups.setdefault(("head", 0, True, ""), {"params": [], "names": [], "lr": base["head"], "lr_scale": 1.0,
                                                      "weight_decay": 0.0, "group": "head", "layer": 0})
        g["params"].append(p)
        g["names"].append(f"loss.{name}")
    # on CUDA one fused kernel updates every tensor; elsewhere torch's foreach default
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(list(groups.values()), betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def apply_freeze(model: nn.Module, freeze: FreezeConfig, epoch: int = 0) -> dict[str, int]:
    """Set requires_grad per the freeze config, with `schedule` entries applied up to `epoch`
    (0-based): e.g. {2: {text_layers: 12}} unfreezes the whole text tower from the third epoch.
    Frozen parameters get no grad, so AdamW keeps no state for them. Returns trainable counts."""
    spec = {"text": freeze.text_layers, "image": freeze.image_stages}
    for start in sorted(int(e) for e in freeze.schedule):
        if start <= epoch:
            step = freeze.schedule.get(start, freeze.schedule.get(str(start), {}))
            spec["text"] = step.get("text_layers", spec["text"])
            spec["image"] = step.get("image_stages", spec["image"])
    layout = model.param_layout(coarse=True)
    adapted = {layout[name][0] for name, _ in model.named_parameters() if ADAPTER in name}  # LoRA towers
    counts = {"head": 0, "text": 0, "image": 0}
    for name, p in model.named_parameters():
        group, layer, top = layout[name]
        n = spec.get(group)
        trainable = ADAPTER in name if group in adapted else n is None or layer > top - n
        p.requires_grad_(trainable)
        if trainable:
            counts[group] += p.numel()
    return counts
