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

from .checkpoint import save_checkpoint
from .config import Config, ModelConfig, to_dict
from .model import create_model
from .tokenizer import prepare_tokenizer

log = logging.getLogger(__name__)
CONTEXT_LENGTH = 52  # Chinese-CLIP's text length


def pretrained_run(name: str, run_dir: str, tokenizer: str | None = None, max_text_length: int | None = None,
                   heads: tuple[int, int] | None = None) -> dict:
    """Write `run_dir/best.pt` and `run_dir/tokenizer/` from Chinese-CLIP weights `name` (a hub
    name, a `transformers` directory or a `cn_clip` checkpoint file); return the source record for
    the bundle's manifest. The image size is the vision tower's own, the text preprocessing
    Chinese-CLIP's (`cn-clip`)."""
    cfg = Config(model=ModelConfig(family="chinese-clip", name=name))
    cfg.model.attention_heads = list(heads) if heads else None  # a shape Chinese-CLIP does not publish
    cfg.model.text.tokenizer = tokenizer
    log.info("loading Chinese-CLIP weights %s", name)
    model, arch = create_model(cfg.model)
    cfg.data.image_size = model.image_size
    text = model.clip.config.text_config
    cfg.data.max_text_length = int(max_text_length or min(CONTEXT_LENGTH, text.max_position_embeddings))
    cfg.data.resize_rule = "squash"  # Chinese-CLIP resizes to a square, as the organisers' 224x224 images are
    cfg.data.text_normalization = "cn-clip"
    prepare_tokenizer(tokenizer, name, "", run_dir, cfg.data.max_text_length, cfg.data.text_normalization)
    source = model.weights_source()
    save_checkpoint(os.path.join(run_dir, "best.pt"), {"model": model.state_dict(), "arch": arch,
                                                       "config": to_dict(cfg), "epoch": 0, "metrics": None,
                                                       "source": source})
    return source
