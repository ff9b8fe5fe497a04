"""Run configuration: dataclasses loaded from a YAML preset plus dotted `--set key=value` overrides.
The model's sections (`model`, and the preprocessing keys that open `data`) are the model
package's (`model.config`); this module composes them with training's.

The schema names its own choices (`Literal` types, checked like every other field's type), so
the model, the optimizer and the data pipeline read validated values and the config imports
none of them. Unknown keys are errors that list the valid ones, so a typo never silently trains
the default.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from infra.records import RecordError, from_dict
from model.config import (
    RENAMED,
    ConfigError,
    LoraConfig,
    ModelConfig,
    Preprocessing,
    check_multiplier,
    renamed_keys,
)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
LossKind = Literal["infonce", "sigmoid"]


@dataclass
class Augment:
    random_resized_crop: list = field(default_factory=lambda: [0.8, 1.0])  # scale range; [] = off
    hflip: float = 0.5                 # probability of a horizontal flip
    color_jitter: float = 0.0          # brightness/contrast/saturation strength; hue is left alone
    grayscale: float = 0.0             # probability of turning the image grey
    blur: float = 0.0                  # probability of a Gaussian blur (radius 0.1 to 1.5 px)
    word_dropout: float = 0.0          # drop each word with this probability; a query without spaces (most Chinese
                                       # ones) drops characters instead; one unit is always kept
    random_swap: float = 0.0           # probability of swapping two neighbouring words (characters, as above)
    # a timm AutoAugment policy ("original": Chinese-CLIP's --use-augment): timm's training transform
    # (random_resized_crop's scales, hflip, the policy, bicubic) replaces the crop/jitter/blur path
    auto_augment: str | None = None    # e.g. original, v0, rand-m9-mstd0.5; null: our own path


@dataclass
class DataConfig(Preprocessing):
    """The model's preprocessing (`model.config.Preprocessing`: its keys come first), then training's."""
    workers: int = 4                   # DataLoader worker processes (and evaluation's decode workers)
    augment: Augment = field(default_factory=Augment)
    skip_bad_images: bool = False      # train on past an undecodable image (the next pair) instead of stopping
    limit_pairs: int | None = None     # debug: train on the first N pairs only


@dataclass
class LrConfig:
    head: float = 1e-3                 # the projection heads and the logit scale
    text: float = 5e-5                 # the text tower's top layer (lower layers: x layer_decay each)
    image: float = 1e-4                # the image tower's top layer (likewise)


@dataclass
class FreezeConfig:
    text_layers: int | None = None     # train only the top N text layers (None: all)
    image_stages: int | None = None    # train only the top N image stages (None: all)
    schedule: dict = field(default_factory=dict)  # {epoch: {text_layers: N, image_stages: M}}


@dataclass
class TrainConfig:
    epochs: int = 3                    # passes over the train pairs
    batch_size: int = 128              # pairs per batch, per process
    accum_steps: int = 1               # optimizer step every N batches
    grad_cache_chunk: int | None = None  # gradient caching: exact large-batch step in chunks of this size
    lr: LrConfig = field(default_factory=LrConfig)
    layer_decay: float = 1.0           # lr multiplier per layer, top to bottom, inside each tower
    weight_decay: float = 0.05         # AdamW's, on weights only (not norms, biases or the logit scale)
    betas: list = field(default_factory=lambda: [0.9, 0.98])  # AdamW's [beta1, beta2]
    eps: float = 1e-6                  # AdamW's epsilon
    warmup_steps: int = 100            # optimizer steps of linear warmup, then cosine decay
    min_lr_ratio: float = 0.0          # cosine floor as a fraction of each group's lr
    grad_clip: float | None = 1.0      # clip the gradients' total norm to this; null: no clipping
    max_skipped_steps: int = 5         # updates skipped in a row (a non-finite loss or gradients) that stop the run
    loss: LossKind = "infonce"         # infonce: symmetric InfoNCE (CLIP's, Chinese-CLIP's); sigmoid: SigLIP's pairwise
                                       # sigmoid loss with a learnable bias (Zhai et al. 2023)
    sigmoid_bias_init: float = -10.0   # train.loss=sigmoid: its learnable bias's start (SigLIP's)
    sigmoid_scale_init: float | None = 10.0  # train.loss=sigmoid: the multiplier's start in a new run (SigLIP's,
                                             # t' = log 10); null: the model's own
    label_smoothing: float = 0.0       # of the contrastive cross-entropy's targets
    hard_negative_margin: float = 0.0  # 0 = off; else hinge on (hardest negative - positive)
    hard_negative_weight: float = 1.0  # the hinge term's weight beside the contrastive loss
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    precision: Precision = "auto"      # auto: bf16 (or fp16) on CUDA, fp32 on CPU
    compile: bool | None = None        # torch.compile the model; None: on for CUDA, off on CPU
    ema: float | None = None           # decay of an EMA of the weights (e.g. 0.999): scored each epoch, may be best.pt
    mask_ratio: float = 0.0            # FLIP: share of image patches dropped in training (Chinese-CLIP's --mask-ratio)
    mask_schedule: dict = field(default_factory=dict)  # {epoch (0-based): ratio from then on}, e.g. {2: 0.0}
    tensorboard: bool = False          # event files in RUN/tensorboard/ (needs the tensorboard package)
    seed: int = 0                      # the random start (weights not loaded) and, unless data_seed, the data
    data_seed: int | None = None       # data order, augmentation, dropout (soup runs: one seed, several data_seeds)
    log_every: int = 10                # batches between progress updates (and divergence checks)


@dataclass
class EvalConfig:
    batch_size: int = 256              # images (and queries) per forward when scoring valid
    every_epochs: int = 1              # score valid every N epochs (and always after the last)
    untrained: bool = True             # also score the model before the first step (epoch 0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _section_hint(cls, parts: list[str]):
    """The type of the field at the dotted path `parts` under dataclass `cls`, or None when some
    part is not a field (`_build` then names the unknown key)."""
    hint = cls
    for part in parts:
        if not dataclasses.is_dataclass(hint):
            return None
        hints = typing.get_type_hints(hint)
        if part not in hints:
            return None
        hint = hints[part]
    return hint


def _keys(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _build(values) -> Config:
    """The config of `values`, by the one rule every record of this project is read with
    (`infra.records`); numbers may be strings, as YAML 1.1 writes some."""
    given = values.get("model") if isinstance(values.get("model"), dict) else {}
    if given:
        values = {**values, "model": renamed_keys(given, "config")}
    try:
        cfg = from_dict(Config, values, what="config", numbers_from_strings=True)
    except RecordError as exc:
        raise ConfigError(str(exc)) from None
    check_multiplier(cfg.model, {new: old for old, new in RENAMED.items() if old in given})
    return cfg


def data_seed(train: TrainConfig) -> int:
    return train.seed if train.data_seed is None else train.data_seed


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _merge(base: dict, update: dict, cls, where: str) -> dict:
    """`update` laid over `base`: a section (a dataclass of the schema) merges key by key, so
    `--set train.lr={text: 1e-4}` keeps the preset's other rates; any other value replaces."""
    out = dict(base)
    for name, value in update.items():
        hint = _section_hint(cls, [name]) if dataclasses.is_dataclass(cls) else None
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint) and isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = _merge(out[name], value, hint, key)
        else:
            out[name] = value
    return out


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` (value parsed as YAML: numbers, bools, null, lists, mappings) laid over the
    preset's values. A section takes only a mapping, merged into the preset's."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: {key.strip()!r} is not a dotted key (e.g. train.lr.text)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
        node = values
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[:depth + 1])} is not a section")
        hint = _section_hint(Config, parts)
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"override {key}={raw.strip()}: {key} is a section ({_keys(hint)}); set one of "
                                  f"its keys, e.g. {key}.{dataclasses.fields(hint)[0].name}=..., or give a mapping")
            value = _merge(node.get(parts[-1]) or {}, value, hint, key)
        node[parts[-1]] = value
    return values


def mask_ratio_at(train: TrainConfig, epoch: int) -> float:
    """The FLIP mask ratio in force in `epoch` (0-based): `mask_ratio`, then each `mask_schedule`
    entry from its epoch on."""
    ratio = float(train.mask_ratio)
    for start in sorted(int(e) for e in train.mask_schedule):
        if start <= epoch:
            ratio = float(train.mask_schedule.get(start, train.mask_schedule.get(str(start))))
    return ratio


def validate_values(cfg: Config) -> Config:
    """What the field types cannot say: positive sizes, seeds, the EMA decay, chunking."""
    data, train = cfg.data, cfg.train
    positive = [("train.epochs", train.epochs), ("train.batch_size", train.batch_size),
                ("train.accum_steps", train.accum_steps), ("data.image_size", data.image_size),
                ("data.max_text_length", data.max_text_length), ("train.log_every", train.log_every),
                ("train.max_skipped_steps", train.max_skipped_steps),
                ("eval.batch_size", cfg.eval.batch_size),
                ("eval.every_epochs", cfg.eval.every_epochs)]
    for key, value in positive:
        if value < 1:
            raise ConfigError(f"{key}={value!r}; expected a positive integer")
    for key, value in (("train.seed", train.seed), ("train.data_seed", train.data_seed),
                       ("data.workers", data.workers)):
        if value is not None and value < 0:
            raise ConfigError(f"{key}={value!r}; expected an integer >= 0")
    aug = data.augment
    if aug.auto_augment is not None:
        if not aug.random_resized_crop:
            raise ConfigError("data.augment.auto_augment needs data.augment.random_resized_crop (its crop's scale "
                              "range, e.g. [0.9, 1.0] as Chinese-CLIP)")
        for key in ("color_jitter", "grayscale", "blur"):
            if getattr(aug, key):
                raise ConfigError(f"data.augment.{key}={getattr(aug, key)} with data.augment.auto_augment: timm's "
                                  "transform takes no other colour augmentation; set it to 0")
        _check_auto_augment(aug.auto_augment)
    from model.factory import check_model_config  # the families, registered as the factory imports them

    check_model_config(cfg.model)
    _check_lora(train)
    _check_loss(cfg)
    if train.tensorboard:
        _check_tensorboard()
    _check_masking(cfg)
    if train.ema is not None and not 0 < train.ema < 1:
        raise ConfigError(f"train.ema={train.ema!r}; expected a decay in (0, 1), e.g. 0.999, or null")
    if train.grad_cache_chunk is not None and (train.grad_cache_chunk < 1 or train.batch_size % train.grad_cache_chunk):
        raise ConfigError(f"train.grad_cache_chunk={train.grad_cache_chunk} must divide "
                          f"train.batch_size={train.batch_size}")
    return cfg


def _check_lora(train: TrainConfig) -> None:
    lora = train.lora
    if lora.rank < 0:
        raise ConfigError(f"train.lora.rank={lora.rank}; expected 0 (off) or a positive rank, e.g. 8")
    if not lora.rank:
        return
    if not lora.alpha > 0:
        raise ConfigError(f"train.lora.alpha={lora.alpha}; expected a positive scale (the adapters' is alpha / rank)")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"train.lora.dropout={lora.dropout}; expected a probability in [0, 1)")
    for key in ("lr_ratio", "b_lr_ratio"):
        value = getattr(lora, key)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"train.lora.{key}={value!r}; expected a positive finite ratio (1: as the rest)")
    for key in ("text_targets", "image_targets"):
        targets = getattr(lora, key)
        if targets is not None and not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"train.lora.{key}={targets!r}; expected a list of layer names (e.g. [query, value])")
    if lora.text_targets == [] and lora.image_targets == []:
        raise ConfigError(f"train.lora.rank={lora.rank} with train.lora.text_targets=[] and train.lora.image_targets=[]"
                          ": no layer gets an adapter, which would be a full fine-tune; name target layers (null: the "
                          "family's default), or set train.lora.rank=0")
    frozen = [f"train.freeze.{k}" for k in ("text_layers", "image_stages", "schedule") if getattr(train.freeze, k)]
    if frozen:
        raise ConfigError(f"train.lora.rank={lora.rank} with {', '.join(frozen)}: LoRA already freezes the adapted "
                          "towers' weights (only the adapters train); set one of them off")


def _check_loss(cfg: Config) -> None:
    """The sigmoid loss's settings, and the InfoNCE-only terms refused beside it."""
    train = cfg.train
    if train.loss != "sigmoid":
        return
    if not math.isfinite(train.sigmoid_bias_init):
        raise ConfigError(f"train.sigmoid_bias_init={train.sigmoid_bias_init!r}; expected a finite number (SigLIP's: "
                          "-10)")
    start, most = train.sigmoid_scale_init, cfg.model.inverse_temperature_max
    if start is not None and not (math.isfinite(start) and 1 <= start <= most):
        raise ConfigError(f"train.sigmoid_scale_init={start!r}; expected a finite number from 1 to "
                          f"model.inverse_temperature_max={most:g} (SigLIP's: 10), or null")
    for key in ("label_smoothing", "hard_negative_margin"):
        if getattr(train, key):
            raise ConfigError(f"train.{key}={getattr(train, key)} with train.loss=sigmoid: it is a term of the InfoNCE "
                              f"loss; set train.{key}=0 or train.loss=infonce")


def _check_tensorboard() -> None:
    """Imported as the tracker imports it: a package that is installed but broken fails here too."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"train.tensorboard=true needs the tensorboard package, which cannot be imported ({exc}): "
                          "pip install tensorboard (or the project's [tensorboard] extra), or set "
                          "train.tensorboard=false") from None


# an epoch of train.mask_schedule: an integer, or its plain decimal digits ("2"; not "02", "２" or "²")
_EPOCH = re.compile(r"0|[1-9][0-9]*")


def _check_masking(cfg: Config) -> None:
    """FLIP's settings: ratios in [0, 1), the schedule's epochs this run's, each once, and a ViT
    image tower wherever a ratio is above 0 (before any weights or tokenizer are fetched)."""
    train = cfg.train
    for key, ratio in [("train.mask_ratio", train.mask_ratio)] + [(f"train.mask_schedule.{e}", r)
                                                                  for e, r in train.mask_schedule.items()]:
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1:
            raise ConfigError(f"{key}={ratio!r}; expected a share of patches in [0, 1), e.g. 0.5")
    seen: dict[int, object] = {}
    for epoch in train.mask_schedule:
        plain = isinstance(epoch, int) and not isinstance(epoch, bool) or isinstance(epoch, str) and \
            _EPOCH.fullmatch(epoch)
        if not plain or not int(epoch) < train.epochs:
            raise ConfigError(f"train.mask_schedule: {epoch!r} is not an epoch of this run (0 to {train.epochs - 1}, "
                              "counted from 0, in plain digits)")
        if int(epoch) in seen:
            raise ConfigError(f"train.mask_schedule: epoch {int(epoch)} is given twice ({seen[int(epoch)]!r} and "
                              f"{epoch!r}); keep one")
        seen[int(epoch)] = epoch
    if any(mask_ratio_at(train, e) for e in range(train.epochs)):
        from model.factory import FAMILIES

        FAMILIES[cfg.model.family].check_mask_ratio(cfg.model)


def _check_auto_augment(policy: str) -> None:
    """The policy built as training builds it (timm's `create_transform`), before any work: a name
    timm does not know is a config error, not a DataLoader worker's traceback."""
    from timm.data import create_transform

    try:
        create_transform(32, is_training=True, scale=(0.9, 1.0), auto_augment=policy)
    except Exception as exc:  # timm asserts, or raises KeyError / ValueError, per policy family
        raise ConfigError(f"data.augment.auto_augment={policy!r}: not a timm AutoAugment policy ({type(exc).__name__}"
                          f": {str(exc)[:120]}); e.g. original (Chinese-CLIP's --use-augment), v0, "
                          "rand-m9-mstd0.5, augmix-m5-w3, or null") from None


def read_preset(path: str) -> dict:
    """A YAML preset: a mapping of sections (model, data, train, eval)."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the preset ({exc})") from None
    if values is None:
        raise ConfigError(f"{path}: an empty preset; a preset is a mapping of sections ({_keys(Config)})")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a preset is a mapping of sections ({_keys(Config)}), not a {type(values).__name__}")
    return values


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    values: dict[str, Any] = read_preset(path) if path else {}
    values = apply_overrides(values, list(overrides))
    return validate_values(_build(values))


def save_config(cfg: Config, path: str) -> None:
    from infra.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False))


def config_from_dict(values: dict, where: str) -> Config:
    """A run's config as its checkpoint saved it, read back into the schema (a key the run did not
    save takes its default); a value that does not fit is a ConfigError naming `where`."""
    try:
        return _build(values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
