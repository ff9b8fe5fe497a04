"""LoRA adapters (`peft`) on a model's transformer towers, and the plain model they merge into.

`add_lora` wraps the tower's `Linear` layers named by `targets` (name suffixes, as peft matches
them) with rank-`rank` adapters, in place: the model keeps its family's class and interface,
its parameters gain `...lora_A.default.weight` / `...lora_B.default.weight` beside each wrapped
layer's `...base_layer.*`. Training then updates the adapters (and whatever the training harness
leaves trainable: the heads, the logit scale, a tower without adapters); the wrapped layers stay
frozen, so they need no gradients and no optimizer state.

`merged_state_dict` is the state dict of the plain architecture (`W + B A * alpha / rank` in
place of each wrapped layer, peft's own delta): what `best.pt` holds, so export, soups and every
other reader of a checkpoint see an ordinary model of that shape.
"""
from __future__ import annotations

import torch
from torch import nn

# peft's defaults where it has one (BERT: query, value); CLIP-style vision towers likewise their
# attention's query and value projections; a timm ViT's fused qkv projection
DEFAULT_TARGETS = {("chinese-clip", "text"): ["query", "value"], ("chinese-clip", "image"): ["q_proj", "v_proj"],
                   ("dual", "text"): ["query", "value"], ("dual", "image"): ["qkv"]}
ADAPTER = ".lora_"  # in the name of every adapter parameter


class LoraTargetError(ValueError):
    """Target names that match no `Linear` layer of a tower; `tower` says which (text | image)."""

    def __init__(self, tower: str, message: str):
        super().__init__(message)
        self.tower = tower


def lora_targets(model, kind: str, suffixes: list[str]) -> list[str]:
    """Full names of the `Linear` layers of tower `kind` whose names end with one of `suffixes`."""
    members = {id(m) for tower in model.tower_modules(kind) for m in tower.modules()}
    return [name for name, module in model.named_modules()
            if id(module) in members and isinstance(module, nn.Linear)
            and any(name == s or name.endswith("." + s) for s in suffixes)]


def add_lora(model, rank: int, alpha: float, dropout: float,
             targets: dict[str, list[str] | None]) -> dict[str, int]:
    """Adapters of `rank` on each tower's layers named by `targets` ({"text": suffixes, "image":
    suffixes}; None: the family's default, `DEFAULT_TARGETS`, which a tower without such layers,
    a CNN, simply does not get); returns the number of layers wrapped per tower. Suffixes given
    that name no `Linear` layer of their tower are a LoraTargetError naming them."""
    import peft

    wrapped, counts = [], {}
    for kind, given in targets.items():
        suffixes = DEFAULT_TARGETS[(model.family, kind)] if given is None else given
        names = lora_targets(model, kind, suffixes) if suffixes else []
        if given and not names:
            raise LoraTargetError(kind, f"no {kind} tower Linear layer is named {', '.join(given)} (by its name's end)")
        wrapped += names
        counts[kind] = len(names)
    if wrapped:
        peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                                     target_modules=wrapped), model)
    return counts


@torch.no_grad()
def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict of `model` as its plain architecture: each wrapped layer's base weight plus
    its adapter's delta (peft's `get_delta_weight`), under the layer's own names. A model without
    adapters: its state dict as it is."""
    from peft.tuners.lora import LoraLayer

    state = model.state_dict()
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    if not layers:
        return state
    out = {k: v for k, v in state.items() if ADAPTER not in k and ".base_layer." not in k}
    for name, layer in layers.items():
        base = layer.get_base_layer()
        out[f"{name}.weight"] = base.weight.detach() + layer.get_delta_weight("default").to(base.weight.dtype)
        if base.bias is not None:
            out[f"{name}.bias"] = base.bias.detach()
    order = [k.replace(".base_layer.", ".") for k in state if ADAPTER not in k]  # the plain model's key order
    return {k: out[k] for k in order}
