"""Run configuration: dataclasses loaded from a YAML preset plus dotted `--set key=value` overrides.

Unknown keys are errors that list the valid ones, so a typo never silently trains the default.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class TextTower:
    name: str | None = None            # hub name or local dir; None: random init from `config`
    config: dict = field(default_factory=dict)  # BertConfig fields for a random tower
    pooling: str = "cls"               # cls | mean | mean_max | attentive
    tokenizer: str | None = None       # None: the tower's own; "char-vocab": built from train queries; or a dir


@dataclass
class ImageTower:
    name: str = "convnext_tiny"        # any timm model name
    pretrained: bool = False
    checkpoint: str | None = None      # local weights file for the timm model (no network)
    kwargs: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    family: str = "dual"               # dual | chinese-clip
    name: str | None = None            # chinese-clip: hub name or local dir; None: random from `config`
    config: dict = field(default_factory=dict)  # chinese-clip: ChineseCLIPConfig fields
    text: TextTower = field(default_factory=TextTower)
    image: ImageTower = field(default_factory=ImageTower)
    embed_dim: int = 512
    head: str = "linear"               # linear | mlp
    head_dropout: float = 0.1
    logit_scale_init: float = 1 / 0.07
    logit_scale_max: float = 100.0
    grad_checkpointing: bool = False


@dataclass
class Augment:
    random_resized_crop: list = field(default_factory=lambda: [0.8, 1.0])  # scale range; [] = off
    hflip: float = 0.5
    color_jitter: float = 0.0          # brightness/contrast/saturation strength; hue is left alone
    grayscale: float = 0.0
    blur: float = 0.0
    word_dropout: float = 0.0
    random_swap: float = 0.0


@dataclass
class DataConfig:
    image_size: int = 224
    resize_rule: str = "squash"        # squash | shorter-crop (see competition.preprocess)
    max_text_length: int = 52
    workers: int = 4
    augment: Augment = field(default_factory=Augment)
    skip_bad_images: bool = False
    limit_pairs: int | None = None     # debug: train on the first N pairs only


@dataclass
class LrConfig:
    head: float = 1e-3
    text: float = 5e-5
    image: float = 1e-4


@dataclass
class FreezeConfig:
    text_layers: int | None = None     # train only the top N text layers (None: all)
    image_stages: int | None = None    # train only the top N image stages (None: all)
    schedule: dict = field(default_factory=dict)  # {epoch: {text_layers: N, image_stages: M}}


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 128              # per process
    accum_steps: int = 1               # optimizer step every N batches
    grad_cache_chunk: int | None = None  # gradient caching: exact large-batch step in chunks of this size
    lr: LrConfig = field(default_factory=LrConfig)
    layer_decay: float = 1.0           # lr multiplier per layer, top to bottom, inside each tower
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0          # cosine floor as a fraction of each group's lr
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0
    hard_negative_margin: float = 0.0  # 0 = off; else hinge on (hardest negative - positive)
    hard_negative_weight: float = 1.0
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    precision: str = "auto"            # auto (bf16/fp16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool | None = None        # torch.compile the model; None: on for CUDA, off on CPU
    ema: float | None = None           # decay of an EMA of the weights (e.g. 0.999): scored each epoch, may be best.pt
    seed: int = 0                      # the random start (weights not loaded) and, unless data_seed, the data
    data_seed: int | None = None       # data order, augmentation, dropout (soup runs: one seed, several data_seeds)
    log_every: int = 10


@dataclass
class EvalConfig:
    batch_size: int = 256
    every_epochs: int = 1
    untrained: bool = True             # also score the model before the first step (epoch 0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


class ConfigError(ValueError):
    pass


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key {where + '.' if where else ''}{unknown[0]}; "
                          f"valid keys{' under ' + where if where else ''}: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        hint, key = hints[name], f"{where}.{name}" if where else name
        kwargs[name] = _build(hint, value or {}, key) if dataclasses.is_dataclass(hint) else _coerce(value, hint, key)
    return cls(**kwargs)


# YAML 1.1 (PyYAML) reads 3e-4 as a string: a number without a dot is only a float in YAML 1.2
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(value, hint, key: str):
    """`value` checked against the field's type (`int`, `float`, `str | None`, `dict`, ...)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = typing.get_args(hint) if union else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if isinstance(value, bool):
            continue  # a bool is an int to Python, never to a config
        if kind is int and isinstance(value, int):
            return value
        if kind is float and isinstance(value, (int, float)):
            return float(value)
        if kind is float and isinstance(value, str) and _NUMBER.match(value.strip()):
            return float(value)
        if kind in (str, dict, list) and isinstance(value, kind):
            return value
    names = " or ".join("null" if k is type(None) else {dict: "a mapping", list: "a list"}.get(k, k.__name__)
                        for k in allowed)
    raise ConfigError(f"{key}={value!r}: expected {names}")


def data_seed(t: TrainConfig) -> int:
    return t.seed if t.data_seed is None else t.data_seed


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` (value parsed as YAML: numbers, bools, null, lists) into a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        node = values
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return values


def check(cfg: Config) -> Config:
    from competition.preprocess import RESIZE_RULES

    from .model import FAMILIES, HEADS, POOLINGS  # the model owns its kinds; imported late (it needs torch)

    m, d, t = cfg.model, cfg.data, cfg.train
    choices = [("model.family", m.family, FAMILIES), ("model.head", m.head, HEADS),
               ("model.text.pooling", m.text.pooling, POOLINGS), ("data.resize_rule", d.resize_rule, RESIZE_RULES),
               ("train.precision", t.precision, ("auto", "fp32", "bf16", "fp16"))]
    for key, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}; expected one of {', '.join(allowed)}")
    positive = [("train.epochs", t.epochs), ("train.batch_size", t.batch_size), ("train.accum_steps", t.accum_steps),
                ("data.image_size", d.image_size), ("data.max_text_length", d.max_text_length)]
    for key, value in positive:
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value!r}; expected a positive integer")
    if t.ema is not None and not 0 < t.ema < 1:
        raise ConfigError(f"train.ema={t.ema!r}; expected a decay in (0, 1), e.g. 0.999, or null")
    if t.grad_cache_chunk is not None and (t.grad_cache_chunk < 1 or t.batch_size % t.grad_cache_chunk):
        raise ConfigError(f"train.grad_cache_chunk={t.grad_cache_chunk} must divide train.batch_size={t.batch_size}")
    return cfg


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    values: dict[str, Any] = {}
    if path:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    values = apply_overrides(values, list(overrides))
    return check(_build(Config, values, ""))


def save_config(cfg: Config, path: str) -> None:
    from competition.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False))
