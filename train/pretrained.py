"""A run directory made from published Chinese-CLIP weights (a hub name or a local directory)
without training: `muge export --pretrained` exports it like a trained run, so a first
submission needs no training.

The checkpoint records where the weights came from (the bundle's manifest copies it): the hub
name with the revision (commit) that was loaded, or the local directory with the sha256 of each
weight file.
"""
from __future__ import annotations

import logging
import os

from competition.io import sha256

from .checkpoint import save_checkpoint
from .config import Config, ModelConfig, to_dict
from .model import create_model
from .tokenizer import prepare_tokenizer

log = logging.getLogger(__name__)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
CONTEXT_LENGTH = 52  # Chinese-CLIP's text length


def weights_source(name: str, model) -> dict:
    """{"pretrained": name, "revision" | "files": ...}: what exactly was loaded."""
    if os.path.isdir(name):
        files = sorted(f for f in os.listdir(name) if f.endswith(WEIGHT_SUFFIXES))
        return {"pretrained": os.path.abspath(name), "files": {f: sha256(os.path.join(name, f)) for f in files}}
    revision = getattr(model.config, "_commit_hash", None)
    return {"pretrained": name, "revision": revision}


def pretrained_run(name: str, run_dir: str, max_text_length: int | None = None) -> dict:
    """Write `run_dir/best.pt` and `run_dir/tokenizer/` from Chinese-CLIP weights `name`; return
    the source record for the bundle's manifest. The image size is the vision tower's own."""
    cfg = Config(model=ModelConfig(family="chinese-clip", name=name))
    log.info("loading Chinese-CLIP weights %s", name)
    model, arch = create_model(cfg.model)
    clip = model.clip.config
    cfg.data.image_size = int(clip.vision_config.image_size)
    cfg.data.max_text_length = int(max_text_length or min(CONTEXT_LENGTH, clip.text_config.max_position_embeddings))
    cfg.data.resize_rule = "squash"  # Chinese-CLIP resizes to a square, as the organisers' 224x224 images are
    prepare_tokenizer(None, name, "", run_dir, cfg.data.max_text_length)
    source = weights_source(name, model.clip)
    save_checkpoint(os.path.join(run_dir, "best.pt"), {"model": model.state_dict(), "arch": arch,
                                                       "config": to_dict(cfg), "epoch": 0, "metrics": None,
                                                       "source": source})
    return source
