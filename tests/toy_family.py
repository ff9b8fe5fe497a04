"""A third model family, in one file: the test that the family contract (`model.family`) is the
whole of it. A tiny BERT text tower, mean-pooled, and a two-layer CNN image tower, each with a
linear head onto the shared space. Defining the class registers it as `model.family: toy`; no
other file of the project knows it."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.family import Layout, RetrievalModel, checkpoint_activations, transformer_layout, with_head_group
from model.layers import CLIP_MEAN, CLIP_STD, PixelNormalize


class ToyEncoder(RetrievalModel):
    family = "toy"

    def __init__(self, arch: dict):
        from transformers import BertConfig, BertModel

        super().__init__()
        self.arch, self.inverse_temperature_max = arch, arch["inverse_temperature_max"]
        self.text = BertModel(BertConfig(**arch["text_config"]), add_pooling_layer=False)
        width = arch["width"]
        self.image = nn.Sequential(nn.Conv2d(3, width, 4, stride=4), nn.GELU(), nn.Conv2d(width, width, 2, stride=2),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.text_proj = nn.Linear(self.text.config.hidden_size, arch["embed_dim"])
        self.image_proj = nn.Linear(width, arch["embed_dim"])
        self.pixels = PixelNormalize(CLIP_MEAN, CLIP_STD)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(arch["inverse_temperature_init"])))

    @classmethod
    def create(cls, cfg: ModelConfig, vocab_size: int | None = None) -> ToyEncoder:
        text = {**cfg.text.config, **({"vocab_size": vocab_size} if vocab_size else {})}
        return cls({"text_config": text, "width": int(cfg.config.get("width", 16)), "embed_dim": cfg.embed_dim,
                    "inverse_temperature_init": cfg.inverse_temperature_init,
                    "inverse_temperature_max": cfg.inverse_temperature_max})

    @classmethod
    def from_arch(cls, arch: dict) -> ToyEncoder:
        return cls({k: v for k, v in arch.items() if k != "family"})

    @staticmethod
    def tokenizer_source(cfg: ModelConfig) -> str | None:
        return None  # a character vocabulary, `model.text.tokenizer: char-vocab`

    @classmethod
    def starts_from_weights(cls, cfg: ModelConfig) -> bool:
        return False

    def encode_text(self, input_ids, attention_mask):
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize(self.text_proj((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)), dim=-1)

    def encode_image(self, pixels):
        return F.normalize(self.image_proj(self.image(self.pixels(pixels))), dim=-1)

    @property
    def text_tower(self):
        return self.text

    def tower_modules(self, kind: str) -> tuple[nn.Module, ...]:
        return (self.text, self.text_proj) if kind == "text" else (self.image, self.image_proj)

    def tower_shape(self, kind: str) -> dict | None:
        return None  # exported as it is, unfused

    def lora_targets(self, kind: str, which: str | None = None) -> list[str]:
        return ["query", "value"] if kind == "text" else []  # a CNN: it trains whole

    def param_layout(self, coarse: bool = False) -> Layout:
        layout = transformer_layout([n for n, _ in self.named_parameters()], "text.", "text")
        for name, _ in self.image.named_parameters():
            layout["image." + name] = ("image", int(name.split(".")[0]), 2)
        return with_head_group(self, layout)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        checkpoint_activations(self.text, enable)
