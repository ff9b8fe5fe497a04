"""Retrieval models: one interface (`encode_text`, `encode_image`, `logit_scale`) for two families.

dual          a Hugging Face text tower (BERT-like) with cls | mean | mean_max | attentive pooling,
              a timm image tower (num_classes=0), linear or MLP projection heads.
chinese-clip  `transformers.ChineseCLIPModel`, fine-tuned end to end with its own projections.

Images enter as uint8 [batch, height, width, 3] (already resized by
`competition.preprocess.resize_image`); cast, scaling, mean/std and transpose happen in
`PixelNormalize`, so the exported ONNX graph contains them too. `create_model` returns the model
and an `arch` dict from which `build_from_arch` rebuilds it without weights or network.
"""
from __future__ import annotations

import math
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from .params import ModelConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PixelNormalize(nn.Module):
    """uint8 NHWC -> normalised float NCHW."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.permute(0, 3, 1, 2).float() * self.scale - self.shift


class TextPool(nn.Module):
    def __init__(self, kind: str, width: int):
        super().__init__()
        self.kind = kind
        self.out_dim = 2 * width if kind == "mean_max" else width
        if kind == "attentive":
            self.score = nn.Linear(width, 1)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        if self.kind == "attentive":
            logits = self.score(hidden).masked_fill(m == 0, torch.finfo(hidden.dtype).min)
            return (logits.softmax(dim=1) * hidden).sum(dim=1)
        mean = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        if self.kind == "mean":
            return mean
        peak = hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
        return torch.cat([mean, peak], dim=-1)


def projection_head(kind: str, in_dim: int, out_dim: int, dropout: float) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.LayerNorm(in_dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(in_dim, out_dim))


class DualEncoder(nn.Module):
    def __init__(self, text: nn.Module, image: nn.Module, pooling: str, embed_dim: int, head: str, dropout: float,
                 mean, std, logit_scale_init: float, logit_scale_max: float):
        super().__init__()
        self.text = text
        self.image = image
        self.pool = TextPool(pooling, text.config.hidden_size)
        self.text_proj = projection_head(head, self.pool.out_dim, embed_dim, dropout)
        self.image_proj = projection_head(head, image.num_features, embed_dim, dropout)
        self.pixels = PixelNormalize(mean, std)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))
        self.logit_scale_max = logit_scale_max

    def encode_text(self, input_ids, attention_mask):
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_proj(self.pool(hidden, attention_mask)), dim=-1)

    def encode_image(self, pixels):
        return F.normalize(self.image_proj(self.image(self.pixels(pixels))), dim=-1)

    def forward(self, pixels, input_ids, attention_mask):
        """(image features, text features, log logit scale): the call DDP wraps."""
        return self.encode_image(pixels), self.encode_text(input_ids, attention_mask), self.logit_scale


class ChineseCLIPEncoder(nn.Module):
    def __init__(self, clip: nn.Module, logit_scale_max: float):
        super().__init__()
        self.clip = clip
        self.pixels = PixelNormalize(CLIP_MEAN, CLIP_STD)
        self.logit_scale_max = logit_scale_max

    @property
    def logit_scale(self):
        return self.clip.logit_scale

    @staticmethod
    def _features(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers >= 5 returns an output

    def encode_text(self, input_ids, attention_mask):
        out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self._features(out), dim=-1)

    def encode_image(self, pixels):
        return F.normalize(self._features(self.clip.get_image_features(pixel_values=self.pixels(pixels))), dim=-1)

    def forward(self, pixels, input_ids, attention_mask):
        """(image features, text features, log logit scale): the call DDP wraps."""
        return self.encode_image(pixels), self.encode_text(input_ids, attention_mask), self.logit_scale


def _hf_kwargs(name: str) -> dict:
    # a local directory never touches the network
    return {"local_files_only": True} if os.path.isdir(name) else {}


def create_model(cfg: ModelConfig, vocab_size: int | None = None) -> tuple[nn.Module, dict]:
    """Build the model named by `cfg`, loading weights from the hub or a local dir where named.
    Returns (model, arch), `arch` being enough for `build_from_arch` to rebuild it offline."""
    import timm
    from transformers import AutoModel, BertConfig, BertModel, ChineseCLIPConfig, ChineseCLIPModel

    if cfg.family == "chinese-clip":
        if cfg.name:
            clip = ChineseCLIPModel.from_pretrained(cfg.name, **_hf_kwargs(cfg.name))
        else:
            conf = dict(cfg.config)
            if vocab_size:
                conf.setdefault("text_config", {})["vocab_size"] = vocab_size
            clip = ChineseCLIPModel(ChineseCLIPConfig(**conf))
        arch = {"family": "chinese-clip", "clip_config": clip.config.to_dict(), "logit_scale_max": cfg.logit_scale_max}
        model = ChineseCLIPEncoder(clip, cfg.logit_scale_max)
    else:
        t = cfg.text
        if t.name:
            text = AutoModel.from_pretrained(t.name, add_pooling_layer=False, **_hf_kwargs(t.name))
        else:
            conf = dict(t.config)
            if vocab_size:
                conf["vocab_size"] = vocab_size
            text = BertModel(BertConfig(**conf), add_pooling_layer=False)
        i = cfg.image
        kwargs = dict(i.kwargs)
        if i.checkpoint:
            kwargs["pretrained_cfg_overlay"] = {"file": i.checkpoint}
        image = timm.create_model(i.name, pretrained=i.pretrained or bool(i.checkpoint), num_classes=0, **kwargs)
        mean = tuple(image.pretrained_cfg.get("mean", CLIP_MEAN))
        std = tuple(image.pretrained_cfg.get("std", CLIP_STD))
        arch = {"family": "dual", "text_config": text.config.to_dict(), "text_model_type": text.config.model_type,
                "image_name": i.name, "image_kwargs": dict(i.kwargs), "pooling": t.pooling, "embed_dim": cfg.embed_dim,
                "head": cfg.head, "head_dropout": cfg.head_dropout, "mean": mean, "std": std,
                "logit_scale_max": cfg.logit_scale_max}
        model = DualEncoder(text, image, t.pooling, cfg.embed_dim, cfg.head, cfg.head_dropout, mean, std,
                            cfg.logit_scale_init, cfg.logit_scale_max)
    if cfg.grad_checkpointing:
        set_grad_checkpointing(model)
    return model, arch


def build_from_arch(arch: dict) -> nn.Module:
    """The model's architecture with random weights (a state_dict is loaded next). Offline."""
    import timm
    from transformers import AutoConfig, AutoModel, ChineseCLIPConfig, ChineseCLIPModel

    if arch["family"] == "chinese-clip":
        return ChineseCLIPEncoder(ChineseCLIPModel(ChineseCLIPConfig(**arch["clip_config"])), arch["logit_scale_max"])
    conf = dict(arch["text_config"])
    text_conf = AutoConfig.for_model(arch["text_model_type"], **{k: v for k, v in conf.items() if k != "model_type"})
    text = AutoModel.from_config(text_conf, add_pooling_layer=False)
    image = timm.create_model(arch["image_name"], pretrained=False, num_classes=0, **arch["image_kwargs"])
    return DualEncoder(text, image, arch["pooling"], arch["embed_dim"], arch["head"], arch["head_dropout"],
                       arch["mean"], arch["std"], 1.0, arch["logit_scale_max"])


def set_grad_checkpointing(model: nn.Module) -> None:
    if isinstance(model, DualEncoder):
        model.text.gradient_checkpointing_enable()
        model.image.set_grad_checkpointing(True)
    else:
        model.clip.gradient_checkpointing_enable()


_TEXT_LAYER = re.compile(r"\.layers?\.(\d+)\.")


def param_layout(model: nn.Module, coarse: bool = False) -> dict[str, tuple[str, int, int]]:
    """name -> (group, layer id, top block id) for every parameter.

    Groups: "head" (projections, pooling, logit scale), "text", "image". Inside a tower, id 0 is
    the stem/embeddings, blocks count up from 1, and anything above the last block (final norms)
    gets top+1. `coarse` groups a timm tower by stage instead of by block (used by freezing).
    """
    from timm.models import group_parameters

    layout: dict[str, tuple[str, int, int]] = {}
    if isinstance(model, DualEncoder):
        towers = {"text": "text.", "image": "image."}
    else:
        towers = {"text": "clip.text_model.", "image": "clip.vision_model."}
    names = [n for n, _ in model.named_parameters()]
    # transformer towers (HF text; Chinese-CLIP vision): embeddings 0, layer i -> i+1, the rest top+1
    for group, prefix in towers.items():
        if group == "image" and isinstance(model, DualEncoder):
            continue
        members = [n for n in names if n.startswith(prefix)]
        ids = {n: int(m.group(1)) + 1 for n in members if (m := _TEXT_LAYER.search(n[len(prefix) - 1:]))}
        top = max(ids.values(), default=0)
        for n in members:
            is_stem = "embeddings" in n or "pre_layrnorm" in n
            layout[n] = (group, ids.get(n, 0 if is_stem else top + 1), top)
    if isinstance(model, DualEncoder):  # timm tower: its own group matcher
        groups = group_parameters(model.image, model.image.group_matcher(coarse=coarse))
        ordered = sorted(groups)
        last = groups[ordered[-1]]
        final_only = len(ordered) > 1 and all(n.split(".")[0] in ("head", "norm", "fc_norm", "final_conv")
                                              for n in last)
        top = len(ordered) - (2 if final_only else 1)
        for rank, gid in enumerate(ordered):
            for n in groups[gid]:
                layout["image." + n] = ("image", rank, top)
    for n in names:
        layout.setdefault(n, ("head", 0, 0))
    return layout
