"""The entry point: a name or a config in, a ready model out (as timm's `create_model`).

    create_model(cfg)      a config's model section -> (model, arch): the family's `create`, weights
                           loaded where the config names them (training starts here)
    build_from_arch(arch)  a checkpoint's architecture record -> the model, random weights, offline
    load_model(source)     a run directory, a muge checkpoint, a hub name, a `transformers` directory
                           or a cn_clip `.pt` -> a `LoadedModel`: the model in eval mode with its
                           weights, its architecture record, its preprocessing, its tokenizer and
                           where its weights came from (export starts here)

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
from .config import ConfigError, ModelConfig, Preprocessing, read_lora, read_sections
from .dual import DualEncoder
from .family import RetrievalModel
from .lora import LoraSettingError, add_lora, has_adapters, merged_state_dict
from .tokenizer import prepare_tokenizer
from .weights import (
    CheckpointError,
    WeightsError,
    checkpoint_path,
    load_checkpoint,
    load_weights,
    names_a_local_path,
    safe_load,
)

log = logging.getLogger(__name__)
FAMILIES = {cls.family: cls for cls in (DualEncoder, ChineseCLIPEncoder)}  # `model.config.Family` names each
CONTEXT_LENGTH = 52  # Chinese-CLIP's text length
RENAMED_ARCH = {"logit_scale_max": "inverse_temperature_max"}  # in the checkpoints of earlier versions
TRANSFORMERS_CONFIG = "config.json"  # what tells a `transformers` directory from a run directory
RUN_CONFIG = "config.yaml"  # a run directory's config (its checkpoints beside it)


def create_model(cfg: ModelConfig, vocab_size: int | None = None) -> tuple[RetrievalModel, dict]:
    """Build the model named by `cfg`, loading weights from the hub or a local dir where named.
    Returns (model, arch), `arch` being enough for `build_from_arch` to rebuild it offline."""
    model = FAMILIES[cfg.family].create(cfg, vocab_size)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing()
    return model, model.to_arch()


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
    with open(source, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    try:  # memory-mapped: only the record is read, not the weights
        obj = safe_load(source, mmap=True) if is_zip else None
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
    ckpt = plain_checkpoint(path, mmap=True)
    model = build_from_arch(ckpt["arch"], path)
    load_weights(model, ckpt.pop("model"), path, assign=True)
    _, data = read_sections(ckpt["config"], path)
    run_tokenizer = directory_tokenizer(run_dir, data.max_text_length, data.text_normalization)

    def save_tokenizer(directory: str) -> TextTokenizer:
        shutil.copytree(os.path.dirname(run_tokenizer.path), os.path.join(directory, TOKENIZER_DIR))
        return directory_tokenizer(directory, data.max_text_length, data.text_normalization)

    origin = {"checkpoint": os.path.abspath(path), "sha256": sha256(path), "epoch": ckpt.get("epoch"),
              "valid_metrics": ckpt.get("metrics")}
    return LoadedModel(model.eval(), ckpt["arch"], data, origin, save_tokenizer, os.path.dirname(run_tokenizer.path),
                       ckpt["config"])


def pretrained_model(name: str, tokenizer: str | None = None, heads: tuple[int, int] | None = None,
                     max_text_length: int | None = None) -> LoadedModel:
    """Chinese-CLIP weights `name` (a hub name, a `transformers` directory or a `cn_clip`
    checkpoint file) as a ready model in memory, with the preprocessing it expects: the image
    size is the vision tower's own, the text preprocessing Chinese-CLIP's (`cn-clip`). Its
    tokenizer: `tokenizer` (a directory or name), or the weights' own (a cn_clip file's: the
    installed cn_clip's vocabulary). `heads` (vision, text): for a cn_clip file of a shape
    Chinese-CLIP does not publish."""
    cfg = ModelConfig(family="chinese-clip", name=name, attention_heads=list(heads) if heads else None)
    log.info("loading Chinese-CLIP weights %s", name)
    model, arch = create_model(cfg)
    text = model.clip.config.text_config
    data = Preprocessing(image_size=model.image_size,
                         max_text_length=int(max_text_length or min(CONTEXT_LENGTH, text.max_position_embeddings)),
                         resize_rule="squash",  # as Chinese-CLIP, and the organisers' 224x224 images
                         text_normalization="cn-clip")

    def save_tokenizer(directory: str) -> TextTokenizer:
        return prepare_tokenizer(tokenizer, name, "", directory, data.max_text_length, data.text_normalization)

    label = f"--tokenizer {tokenizer}" if tokenizer else f"the tokenizer of {name}"
    return LoadedModel(model.eval(), arch, data, {"pretrained": model.weights_source()}, save_tokenizer, label)
