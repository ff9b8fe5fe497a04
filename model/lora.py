"""LoRA adapters (`peft`) on a model's transformer towers, and the plain model they merge into.

`add_lora` wraps the tower's `Linear` layers named by `train.lora`'s targets (name suffixes, as
peft matches them; the family's own default where none are given) with adapters, in place: the
model keeps its family's class and interface, its parameters gain `...lora_A.default.weight` /
`...lora_B.default.weight` beside each wrapped layer's `...base_layer.*`. Training then updates
the adapters (and whatever the training harness leaves trainable: the heads, the logit scale, a
tower without adapters); the wrapped layers stay frozen, so they need no gradients and no
optimizer state. `plan_lora` checks the settings against the model first, naming the key.

`merged_state_dict` is the state dict of the plain architecture (`W + B A * alpha / rank` in
place of each wrapped layer, peft's own delta; DoRA's rescaled direction, peft's own merge): what
`best.pt` holds, so export, soups and every
other reader of a checkpoint see an ordinary model of that shape; `model.factory` merges a LoRA
run's `last.pt` the same way.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .config import LoraConfig

log = logging.getLogger(__name__)
ADAPTER = ".lora_"  # in the name of every adapter parameter
SECTION = "train.lora"  # where the settings are, for messages


class LoraSettingError(ValueError):
    """`train.lora` settings that do not fit the model; the message names the key."""


def has_adapters(state: dict) -> bool:
    """Whether a state dict holds LoRA adapters (a LoRA run's `last.pt`)."""
    return any(ADAPTER in key for key in state)


def lora_targets(model, kind: str, suffixes: list[str]) -> list[str]:
    """Full names of the `Linear` layers of tower `kind` whose names end with one of `suffixes`."""
    members = {id(m) for tower in model.tower_modules(kind) for m in tower.modules()}
    return [name for name, module in model.named_modules()
            if id(module) in members and isinstance(module, nn.Linear)
            and any(name == s or name.endswith("." + s) for s in suffixes)]


def plan_lora(model, lora: LoraConfig) -> dict[str, list[str]]:
    """The layers `lora` adapts in each tower (`text`, `image`), checked against `model` before
    anything is allocated: given targets must name a `Linear` layer of their tower (the family's
    default, `model.lora_targets`, may match none: a CNN tower trains as configured), some layer
    must be adapted, and the rank may not pass the adapted layers' width (past it an adapter adds
    cost and no capacity). A LoraSettingError names the key."""
    plan = {}
    for kind in ("text", "image"):
        given = getattr(lora, f"{kind}_targets")
        suffixes = model.lora_targets(kind, lora.targets) if given is None else given
        plan[kind] = lora_targets(model, kind, suffixes) if suffixes else []
        if given and not plan[kind]:
            raise LoraSettingError(f"{SECTION}.{kind}_targets={given!r}: no {kind} tower Linear layer is named "
                                   f"{', '.join(given)} (by its name's end)")
    layers = dict(model.named_modules())
    adapted = [layers[name] for names in plan.values() for name in names]
    if not adapted:
        raise LoraSettingError(f"{SECTION}.rank={lora.rank}, but no layer gets an adapter ({SECTION}.targets="
                               f"{lora.targets!r}, text_targets={lora.text_targets!r}, image_targets="
                               f"{lora.image_targets!r}): that would be a full fine-tune; name target layers, or set "
                               f"{SECTION}.rank=0")
    width = min(min(m.in_features, m.out_features) for m in adapted)
    if lora.rank > width:
        raise LoraSettingError(f"{SECTION}.rank={lora.rank} is above the width of the adapted layers ({width}): a "
                               f"rank past it adds cost and no capacity; set {SECTION}.rank to {width} or less")
    return plan


def add_lora(model, lora: LoraConfig) -> dict[str, int]:
    """Adapters per `lora` on the model's towers (checked by `plan_lora` first); returns the number
    of layers wrapped per tower."""
    import peft

    plan = plan_lora(model, lora)
    wrapped = [name for names in plan.values() for name in names]
    try:
        peft.inject_adapter_in_model(peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=wrapped, use_rslora=lora.use_rslora,
                                                     use_dora=lora.use_dora), model)
    except (RuntimeError, MemoryError) as exc:  # the allocator's refusal
        raise LoraSettingError(f"{SECTION}.rank={lora.rank}: the adapters do not fit in memory "
                               f"({' '.join(str(exc).split())[:160]}); choose a smaller rank") from None
    counts = {kind: len(names) for kind, names in plan.items()}
    log.info("LoRA rank %d on %s", lora.rank, ", ".join(f"{n} {kind} layers" if n else f"no {kind} layer (it trains "
                                                        "as configured)" for kind, n in counts.items()))
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
        if "default" in getattr(layer, "lora_variant", {}):  # DoRA: peft's own merge, on a copy of the weight
            out[f"{name}.weight"] = layer.lora_variant["default"].merge_safe(layer, "default", base.weight.detach())
        else:
            out[f"{name}.weight"] = base.weight.detach() + layer.get_delta_weight("default").to(base.weight.dtype)
        if base.bias is not None:
            out[f"{name}.bias"] = base.bias.detach()
    order = [k.replace(".base_layer.", ".") for k in state if ADAPTER not in k]  # the plain model's key order
    return {k: out[k] for k in order}
