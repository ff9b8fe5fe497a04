"""The entry point: a name or a config in, a ready model out (as timm's `create_model`). Every
model the project builds comes from here.

    create_model(cfg)      a config's model section -> (model, arch): the family's `create`, weights
                           loaded where the config names them, LoRA adapters where asked, a resumed
                           run's weights (training starts here)
    build_from_arch(arch)  a checkpoint's architecture record -> the model, random weights, offline
    load_model(source)     a run directory, a muge checkpoint, a hub name, a `transformers` directory
                           or a cn_clip `.pt` -> a `LoadedModel`: the model in eval mode with its
                           weights, its architecture record, its preprocessing, its tokenizer and
                           where its weights came from (export starts here)
    checkpoint_model(ckpt) a checkpoint's dict in memory (a soup not yet written) -> a `LoadedModel`

Published Chinese-CLIP weights come with the preprocessing Chinese-CLIP uses: the vision tower's
own image size, squashed, and `cn-clip` text normalisation. Their source record says where they
came from (the bundle's manifest copies it): the hub name with the revision (commit) that was
loaded, or the local files with the sha256 of each.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from competition.preprocess import TOKENIZER_DIR, TextTokenizer, directory_tokenizer
from infra.io import sha256

from .chinese_clip import ChineseCLIPEncoder
from .config import CHECKPOINT_SUFFIXES, ConfigError, LoraConfig, ModelConfig, Preprocessing, read_lora, read_sections
from .dual import DualEncoder  # noqa: F401 (defining a family registers it in FAMILIES)
from .family import FAMILIES, RetrievalModel
from .lora import LoraSettingError, add_lora, has_adapters, merged_state_dict
from .tokenizer import prepare_tokenizer
from .weights import (
    CheckpointError,
    WeightsError,
    checkpoint_path,
    is_torch_zip,
    load_checkpoint,
    load_weights,
    names_a_local_path,
    safe_load,
)

log = logging.getLogger(__name__)
PUBLISHED_FAMILY = ChineseCLIPEncoder  # the family of published weights (`--pretrained`: Chinese-CLIP's)
RENAMED_ARCH = {"logit_scale_max": "inverse_temperature_max"}  # in the checkpoints of earlier versions
TRANSFORMERS_CONFIG = "config.json"  # what tells a `transformers` directory from a run directory
RUN_CONFIG = "config.yaml"  # a run directory's config (its checkpoints beside it)


@dataclass
class Resume:
    """A run's `last.pt` that training resumes from: its weights (adapters included), and its
    architecture, rebuilt where the weights file the run started from (`model.name`) has moved."""
    checkpoint: dict
    path: str
    hint: str = ""  # said where the weights do not fit (the config edited since, say)


def check_model_config(model: ModelConfig) -> None:
    """What the field types cannot say of the model section: the family is one of the registered
    ones (`model.family.FAMILIES`), and the family's own checks (`RetrievalModel.check_config`)."""
    if model.family not in FAMILIES:
        raise ConfigError(f"model.family={model.family!r}; expected one of {', '.join(sorted(FAMILIES))}")
    heads = model.attention_heads
    if heads is not None and (len(heads) != 2 or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0
                                                         for h in heads)):
        raise ConfigError(f"model.attention_heads={heads!r}; expected [vision, text], two positive counts")
    FAMILIES[model.family].check_config(model)


def create_model(cfg: ModelConfig, vocab_size: int | None = None, lora: LoraConfig | None = None,
                 resume: Resume | None = None) -> tuple[RetrievalModel, dict]:
    """Build the model named by `cfg`, loading weights from the hub or a local dir where named;
    with `lora` (a rank above 0) its adapters (a LoraSettingError naming the key where they do not
    fit), and with `resume` the run's weights. Returns (model, arch), `arch` being enough for
    `build_from_arch` to rebuild it offline (the plain model, without adapters)."""
    if resume is not None and start_file_gone(cfg.name):
        model = build_from_arch(resume.checkpoint["arch"], resume.path)
    else:
        model = FAMILIES[cfg.family].create(cfg, vocab_size)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing()
    arch = model.to_arch() if resume is None else resume.checkpoint["arch"]
    if lora is not None and lora.rank:
        add_lora(model, lora)
    if resume is not None:
        load_weights(model, resume.checkpoint["model"], resume.path, resume.hint)
    return model, arch


def start_file_gone(name: str | None) -> bool:
    """`model.name` names a local weights file that is no longer there."""
    return bool(name) and (name.endswith(CHECKPOINT_SUFFIXES) or os.path.isabs(name)) and not os.path.exists(name)


def build_from_arch(arch: dict, path: str = "the checkpoint") -> RetrievalModel:
    """The model's architecture with random weights (a state_dict is loaded next). Offline. A
    CheckpointError, naming `path`, when the record is not one this version can build."""
    arch = {RENAMED_ARCH.get(key, key): value for key, value in arch.items()}
    try:
        return FAMILIES[arch["family"]].from_arch(arch)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its architecture record cannot be rebuilt ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from None


@dataclass
class LoadedModel:
    model: RetrievalModel              # in eval mode, its weights loaded
    arch: dict                         # what `build_from_arch` rebuilds it from
    preprocessing: Preprocessing       # how its inputs are made: image size and resizing, text length and normalisation
    origin: dict                       # where its weights came from: a run's checkpoint, sha256, epoch and valid
                                       # metrics, or the pretrained weights' source record (`pretrained`)
    save_tokenizer: Callable[[str], TextTokenizer]  # writes DIR/tokenizer/ and returns it loaded
    tokenizer_label: str               # what an error about the tokenizer calls it
    config: dict | None = None         # a run's whole config, as its checkpoint saved it (None: published weights)
    tokenizer: TextTokenizer | None = None  # a run's own tokenizer, loaded (None: published weights')


def load_model(source: str, checkpoint: str = "best", tokenizer: str | None = None,
               heads: tuple[int, int] | None = None) -> LoadedModel:
    """`source` as a ready model: a run directory (its `checkpoint`: best | last | a .pt path), a
    muge checkpoint file (its run directory holds the tokenizer), or published Chinese-CLIP weights
    (a hub name, a `transformers` directory with its config.json, a cn_clip `.pt`). `tokenizer`
    and `heads` go with published weights only (`pretrained_model`); a run brings its own."""
    _check_source(source, checkpoint)
    run_dir = _run_dir(source)
    if run_dir is None:
        return pretrained_model(source, tokenizer, heads)
    if tokenizer or heads:
        raise WeightsError(f"{source}: a run's checkpoint brings its own tokenizer and architecture; a tokenizer or "
                           "attention heads go with published weights only")
    return run_model(run_dir, source if os.path.isfile(source) else checkpoint)


def _check_source(source: str, checkpoint: str) -> None:
    """A local path that is not there, or a directory that is neither published weights nor a run,
    named as such (not as a hub id that could not be fetched, or a missing best.pt)."""
    if not os.path.exists(os.path.expanduser(source)):
        if names_a_local_path(source):
            raise WeightsError(f"{source}: not found (no such file or directory)")
        return  # a hub id
    wanted = os.path.basename(checkpoint_path(source, checkpoint)) if os.path.isdir(source) else None
    held = [name for name in (TRANSFORMERS_CONFIG, RUN_CONFIG, wanted) if wanted and
            os.path.isfile(os.path.join(source, name))]
    if wanted and not held:
        raise WeightsError(f"{source}: no {TRANSFORMERS_CONFIG} or {wanted}: neither published weights (a "
                           "transformers directory) nor a training run")


def source_paths(source: str, checkpoint: str = "best") -> list[str]:
    """What a load of `source` reads on disk, which an output must never replace: the run directory
    (a muge checkpoint file's own), a `checkpoint` given as a path, or the published weights' file
    or directory (a hub name reads nothing here)."""
    run_dir = _run_dir(source)
    if run_dir is None:
        return [source]
    return [run_dir] + ([checkpoint] if os.path.isfile(checkpoint) else [])


def _run_dir(source: str) -> str | None:
    """The run directory `source` names (itself, or a muge checkpoint file's directory), or None
    for published weights."""
    if os.path.isdir(source):
        return None if os.path.isfile(os.path.join(source, TRANSFORMERS_CONFIG)) else source
    if not os.path.isfile(source):
        return None  # a hub name
    try:  # memory-mapped: only the record is read, not the weights
        obj = safe_load(source, mmap=True) if is_torch_zip(source) else None
    except CheckpointError:
        obj = None  # cn_clip's reader names what is wrong with it
    is_ours = isinstance(obj, dict) and {"model", "arch", "config"} <= obj.keys()
    return os.path.dirname(os.path.abspath(source)) if is_ours else None


def plain_checkpoint(path: str, mmap: bool = False) -> dict:
    """A muge checkpoint whose `model` is its plain architecture's state dict: a LoRA run's
    `last.pt` holds adapters beside the frozen weights, merged here as `best.pt`'s are (peft's
    delta, with the run's own `train.lora` settings), so every reader sees an ordinary model."""
    ckpt = load_checkpoint(path, mmap=mmap)
    if has_adapters(ckpt["model"]):
        model = build_from_arch(ckpt["arch"], path)
        try:
            add_lora(model, read_lora(ckpt["config"], path))
        except (ConfigError, LoraSettingError) as exc:
            raise CheckpointError(f"{path}: holds LoRA adapters that its config's train.lora cannot rebuild "
                                  f"({exc})") from None
        load_weights(model, ckpt["model"], path, " (a LoRA run's last.pt: adapters beside the frozen weights)")
        ckpt["model"] = merged_state_dict(model)
    return ckpt


def run_model(run_dir: str, checkpoint: str = "best") -> LoadedModel:
    """A run's checkpoint rebuilt offline, memory-mapped: the model takes the file's tensors as
    they are (one copy of the weights, not two), with the run's tokenizer and preprocessing; a
    LoRA run's `last.pt` with its adapters merged (`plain_checkpoint`)."""
    path = checkpoint_path(run_dir, checkpoint)
    return checkpoint_model(plain_checkpoint(path, mmap=True), path, run_dir)


def checkpoint_model(ckpt: dict, path: str, run_dir: str) -> LoadedModel:
    """A muge checkpoint's dict (its `model` the plain architecture's state dict) as a ready model,
    taking the dict's tensors, with `run_dir`'s tokenizer and the checkpoint's preprocessing.
    `path` names it (a file not written yet, such as a soup being scored, has no sha256)."""
    model = build_from_arch(ckpt["arch"], path)
    load_weights(model, ckpt["model"], path, assign=True)
    _, data = read_sections(ckpt["config"], path)
    run_tokenizer = directory_tokenizer(run_dir, data.max_text_length, data.text_normalization)

    def save_tokenizer(directory: str) -> TextTokenizer:
        shutil.copytree(os.path.dirname(run_tokenizer.path), os.path.join(directory, TOKENIZER_DIR))
        return directory_tokenizer(directory, data.max_text_length, data.text_normalization)

    origin = {"checkpoint": os.path.abspath(path), "sha256": sha256(path) if os.path.isfile(path) else None,
              "epoch": ckpt.get("epoch"), "valid_metrics": ckpt.get("metrics")}
    return LoadedModel(model.eval(), ckpt["arch"], data, origin, save_tokenizer, os.path.dirname(run_tokenizer.path),
                       ckpt["config"], run_tokenizer)


def pretrained_model(name: str, tokenizer: str | None = None, heads: tuple[int, int] | None = None,
                     max_text_length: int | None = None) -> LoadedModel:
    """Chinese-CLIP weights `name` (a hub name, a `transformers` directory or a `cn_clip`
    checkpoint file) as a ready model in memory, with the preprocessing it expects: the image
    size is the vision tower's own, the text preprocessing Chinese-CLIP's (`cn-clip`). Its
    tokenizer: `tokenizer` (a directory or name), or the weights' own (a cn_clip file's: the
    installed cn_clip's vocabulary). `heads` (vision, text): for a cn_clip file of a shape
    Chinese-CLIP does not publish."""
    cfg = ModelConfig(family=PUBLISHED_FAMILY.family, name=name, attention_heads=list(heads) if heads else None)
    log.info("loading published weights %s", name)
    model, arch = create_model(cfg)
    data = model.published_preprocessing(max_text_length)

    def save_tokenizer(directory: str) -> TextTokenizer:
        return prepare_tokenizer(tokenizer, name, "", directory, data.max_text_length, data.text_normalization)

    label = f"--tokenizer {tokenizer}" if tokenizer else f"the tokenizer of {name}"
    return LoadedModel(model.eval(), arch, data, {"pretrained": model.weights_source()}, save_tokenizer, label)
