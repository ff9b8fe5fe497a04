"""The model's config sections (`model:` of a run config) and its preprocessing (the `data:` keys
a bundle's manifest records), apart from the training harness's: `train.config` composes them
into a run's config; export reads them back from a checkpoint without the rest.

The schema names its own choices (`Literal` types, checked like every other field's type); field
comments are the config reference (`make docs` writes docs/config.md from them).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Literal

from competition.preprocess import RESIZE_RULES, TEXT_NORMALIZATIONS
from infra.records import RecordError, from_dict

Pooling = Literal["cls", "mean", "mean_max", "attentive"]
Head = Literal["linear", "mlp"]
ResizeRule = Literal[RESIZE_RULES]  # competition.preprocess owns the rules: predict resizes with them too
TextNormalization = Literal[tuple(TEXT_NORMALIZATIONS)]  # likewise: predict reads it from the manifest
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin")  # model.name: a weights file rather than a hub name or directory
log = logging.getLogger(__name__)


class ConfigError(ValueError):
    pass


@dataclass
class TextTower:
    name: str | None = None            # hub name or local dir; None: random init from `config`
    config: dict = field(default_factory=dict)  # BertConfig fields for a random tower
    pooling: Pooling = "cls"           # text token states -> one vector: [CLS], mean, mean+max, or learned attention
    tokenizer: str | None = None       # None: the tower's own; "char-vocab": built from train queries; or a dir


@dataclass
class ImageTower:
    name: str = "convnext_tiny"        # any timm model name
    pretrained: bool = False           # timm's published weights for `name` (from the hub, or timm's cache)
    checkpoint: str | None = None      # local weights file for the timm model (no network)
    kwargs: dict = field(default_factory=dict)  # more timm.create_model arguments, e.g. {drop_path_rate: 0.1}


@dataclass
class ModelConfig:
    family: str = "dual"               # a registered model family (model/): dual, any BERT + any timm tower;
                                       # chinese-clip, ChineseCLIPModel
    name: str | None = None            # chinese-clip: hub name or local dir; None: random from `config`
    config: dict = field(default_factory=dict)  # chinese-clip: ChineseCLIPConfig fields
    attention_heads: list | None = None  # [vision, text] of a cn_clip file of a shape Chinese-CLIP does not publish
    text: TextTower = field(default_factory=TextTower)
    image: ImageTower = field(default_factory=ImageTower)
    embed_dim: int = 512               # the shared embedding size (dual; Chinese-CLIP's is its projection_dim)
    head: Head = "linear"              # dual: each tower's projection onto embed_dim, one layer or an MLP
    head_dropout: float = 0.1          # dropout inside the mlp head
    inverse_temperature_init: float = 1 / 0.07  # the similarity multiplier at a random start (the model learns its
                                                # log, `logit_scale`, as CLIP does)
    inverse_temperature_max: float = 100.0  # the multiplier's clamp in training
    grad_checkpointing: bool = False   # recompute each block's activations in backward: less memory, ~30% slower


@dataclass
class Preprocessing:
    """What the model's inputs are made with, in training's evaluation and in predict alike (the
    bundle's manifest copies it); the `data:` section of a run config begins with these keys."""
    image_size: int = 224              # pixels a side the model sees (a ViT's is its own: checked)
    resize_rule: ResizeRule = "squash"  # squash to the square, or scale the shorter side and centre-crop
    max_text_length: int = 52          # tokens a query is cut to, [CLS] and [SEP] included (Chinese-CLIP: 52)
    text_normalization: TextNormalization = "nfkc+collapse-whitespace"  # before the tokenizer; cn-clip: Chinese-CLIP's


LoraTargets = Literal["qv", "attention", "all-linear"]  # named sets of a tower's layers (the family names them)


@dataclass
class LoraConfig:
    """`train.lora`: LoRA adapters on the model's transformer towers (`model.lora`, through peft)."""
    rank: int = 0                      # LoRA adapters of this rank on the transformer towers (peft); 0: off, full
                                       # fine-tuning
    alpha: float = 16.0                # the adapters' scale is alpha / rank (alpha / sqrt(rank) with use_rslora)
    dropout: float = 0.0               # dropout on the adapters' input, in training
    targets: LoraTargets | None = None  # which layers, a named set: qv (attention query and value), attention (every
                                        # attention projection), all-linear (every Linear layer of the tower); null:
                                        # the family's default (all-linear in both: `muge bench lora --sweep`)
    text_targets: list | None = None   # text tower Linear layers to adapt, by name suffix (e.g. [query, value]),
                                       # in place of `targets`; null: `targets`
    image_targets: list | None = None  # image tower likewise; [] or a CNN tower: no adapters, it trains as configured
    lr_ratio: float = 10.0             # the adapters' learning rate over their tower's (train.lr.text / image,
                                       # layer decay applied); 10 measured (`muge bench lora --sweep`)
    b_lr_ratio: float = 1.0            # LoRA+ (Hayou et al. 2024): the B matrices' rate over the A matrices'; 1:
                                       # plain LoRA
    use_rslora: bool = False           # rsLoRA: scale by alpha / sqrt(rank), which keeps high ranks learning
    use_dora: bool = False             # DoRA (Liu et al. 2024): adapt each weight's direction, learn its magnitude


# keys of the model section under their former names: a config (a preset, a saved run's config.yaml)
# that uses one is read as if it used the new one, with a warning
RENAMED = {"logit_scale_init": "inverse_temperature_init", "logit_scale_max": "inverse_temperature_max"}


def renamed_keys(section: dict, where: str) -> dict:
    """The model section `section` with any key under its former name (`RENAMED`) renamed."""
    old = [key for key in RENAMED if key in section]
    for key in old:
        new = RENAMED[key]
        if new in section:
            raise ConfigError(f"{where}: model.{key} and model.{new} are one setting (its former name and its "
                              f"name): keep model.{new}")
        log.warning("%s: model.%s is now model.%s (the multiplier, 1 / temperature; the model's logit_scale is its "
                    "log): read as such", where, key, new)
    return {RENAMED.get(key, key): value for key, value in section.items()}


def read_sections(config: dict, where: str) -> tuple[ModelConfig, Preprocessing]:
    """The model section and the preprocessing keys of the data section of a whole run config (a
    preset's mapping, or the config a checkpoint saved), read by the project's record rule; the
    other sections and keys are the training harness's to read. A value that does not fit is a
    ConfigError naming `where`."""
    sections = []
    for key, cls in (("model", ModelConfig), ("data", Preprocessing)):
        values = config.get(key) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: config: {key}: expected a mapping, got a {type(values).__name__}")
        if cls is Preprocessing:
            keys = {f.name for f in dataclasses.fields(cls)}
            values = {k: v for k, v in values.items() if k in keys}
        else:
            values = renamed_keys(values, where)
        try:
            sections.append(from_dict(cls, values, what=f"config: {key}", numbers_from_strings=True))
        except RecordError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return sections[0], sections[1]


# what a saved `train.lora` without `targets` (a run trained before the key existed) was trained with:
# the defaults of then, query and value at the tower's own rate, not today's
LORA_BEFORE_TARGETS = {"targets": "qv", "lr_ratio": 1.0}


def read_lora(config: dict, where: str) -> LoraConfig:
    """`train.lora` of a whole run config (the config a checkpoint saved), read by the record rule,
    with the settings it was trained with where it predates a key (`LORA_BEFORE_TARGETS`)."""
    values = (config.get("train") or {}).get("lora") or {}
    if values and "targets" not in values:
        values = {**LORA_BEFORE_TARGETS, **values}
    try:
        return from_dict(LoraConfig, values, what="config: train: lora", numbers_from_strings=True)
    except RecordError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def check_multiplier(model: ModelConfig, former: dict[str, str] | None = None) -> None:
    """The similarity multiplier's settings: finite, from 1 to `inverse_temperature_max` (training
    clamps exp(logit_scale) to [1, max]). A ConfigError names the key as the config wrote it
    (`former`: a field's former name, where that was used)."""
    def key(name: str) -> str:
        return f"model.{(former or {}).get(name, name)}"

    init, most = model.inverse_temperature_init, model.inverse_temperature_max
    if not (math.isfinite(most) and most >= 1):
        raise ConfigError(f"{key('inverse_temperature_max')}={most!r}; expected a finite number of at least 1 (the "
                          "multiplier's clamp in training; CLIP's is 100)")
    if not (math.isfinite(init) and 1 <= init <= most):
        raise ConfigError(f"{key('inverse_temperature_init')}={init!r}; expected a finite number from 1 to "
                          f"{key('inverse_temperature_max')}={most:g} (training clamps the multiplier to that range; "
                          "CLIP starts at 1 / 0.07 = 14.3)")
