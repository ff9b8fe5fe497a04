"""Published Chinese-CLIP weights (a hub name, a local directory or a cn_clip file) as a ready
model in memory, without training: `muge export --pretrained` exports it as it exports a trained
run, so a first submission needs no training, and writes nothing but the bundle.

The source record says where the weights came from (the bundle's manifest copies it): the hub
name with the revision (commit) that was loaded, or the local files with the sha256 of each.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from competition.preprocess import TextTokenizer

from .config import Config, DataConfig, ModelConfig
from .model import ChineseCLIPEncoder, create_model
from .tokenizer import prepare_tokenizer

log = logging.getLogger(__name__)
CONTEXT_LENGTH = 52  # Chinese-CLIP's text length


@dataclass
class PretrainedModel:
    model: ChineseCLIPEncoder          # in eval mode
    arch: dict
    data: DataConfig                   # its preprocessing: image size, text length and normalisation
    source: dict                       # where the weights came from, for the bundle's manifest


def pretrained_model(name: str, max_text_length: int | None = None,
                     heads: tuple[int, int] | None = None) -> PretrainedModel:
    """Chinese-CLIP weights `name` (a hub name, a `transformers` directory or a `cn_clip`
    checkpoint file) as a ready model in memory, with the preprocessing it expects: the image
    size is the vision tower's own, the text preprocessing Chinese-CLIP's (`cn-clip`)."""
    cfg = Config(model=ModelConfig(family="chinese-clip", name=name))
    cfg.model.attention_heads = list(heads) if heads else None  # a shape Chinese-CLIP does not publish
    log.info("loading Chinese-CLIP weights %s", name)
    model, arch = create_model(cfg.model)
    text = model.clip.config.text_config
    data = dataclasses.replace(cfg.data, image_size=model.image_size,
                               max_text_length=int(max_text_length or min(CONTEXT_LENGTH,
                                                                          text.max_position_embeddings)),
                               resize_rule="squash",  # as Chinese-CLIP, and the organisers' 224x224 images
                               text_normalization="cn-clip")
    return PretrainedModel(model.eval(), arch, data, model.weights_source())


def write_pretrained_tokenizer(name: str, tokenizer: str | None, directory: str, data: DataConfig) -> TextTokenizer:
    """`directory/tokenizer/` for weights `name`: `tokenizer` (a directory or name), or the
    weights' own (a cn_clip file's: the installed cn_clip's vocabulary)."""
    return prepare_tokenizer(tokenizer, name, "", directory, data.max_text_length, data.text_normalization)
