"""The dual family: a Hugging Face text tower (BERT-like) with cls | mean | mean_max | attentive
pooling, a timm image tower (num_classes=0), linear or MLP projection heads onto a shared space."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, ImageTower, ModelConfig
from .family import Layout, RetrievalModel, checkpoint_activations, transformer_layout, with_head_group
from .layers import BERT_LORA_TARGETS, CLIP_MEAN, CLIP_STD, PixelNormalize, TextPool, projection_head
from .weights import load_pretrained


def flip_refusal(image: ImageTower) -> str:
    return (f"FLIP masking (train.mask_ratio, train.mask_schedule): the image tower {image.name} has no patch tokens "
            "to drop (FLIP masking needs a ViT image tower); set train.mask_ratio=0")


class DualEncoder(RetrievalModel):
    family = "dual"

    def __init__(self, text: nn.Module, image: nn.Module, arch: dict, inverse_temperature_init: float = 1.0):
        super().__init__()
        self.arch, self.inverse_temperature_max = arch, arch["inverse_temperature_max"]
        self.text = text
        self.image = image
        self.pool = TextPool(arch["pooling"], text.config.hidden_size)
        self.text_proj = projection_head(arch["head"], self.pool.out_dim, arch["embed_dim"], arch["head_dropout"])
        self.image_proj = projection_head(arch["head"], image.num_features, arch["embed_dim"], arch["head_dropout"])
        self.pixels = PixelNormalize(arch["mean"], arch["std"])
        self.logit_scale = nn.Parameter(torch.tensor(math.log(inverse_temperature_init)))

    @staticmethod
    def tokenizer_source(cfg: ModelConfig) -> str | None:
        return cfg.text.name

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        super().check_config(cfg)
        if cfg.name:
            raise ConfigError(f"model.name={cfg.name!r} names Chinese-CLIP weights, which model.family=dual does not "
                              "use (its towers are model.text.name and model.image.name / model.image.checkpoint): "
                              "set model.family=chinese-clip, or use a cnclip-* preset")

    @classmethod
    def check_mask_ratio(cls, cfg: ModelConfig) -> None:
        """timm builds the image tower on the meta device (no memory, no weights) to show whether
        it has patch tokens; a name timm does not know is left to the model's builder to name."""
        import timm
        import torch

        try:
            with torch.device("meta"):
                tower = timm.create_model(cfg.image.name, pretrained=False, **cfg.image.kwargs)
        except Exception:  # timm's RuntimeError for an unknown name, TypeError for a bad kwarg, ...
            return
        if not hasattr(tower, "patch_drop"):
            raise ConfigError(flip_refusal(cfg.image))

    @classmethod
    def starts_from_weights(cls, cfg: ModelConfig) -> bool:
        return bool(cfg.text.name or cfg.image.pretrained or cfg.image.checkpoint)

    def ignored_settings(self, cfg: ModelConfig) -> dict[str, str]:
        """`model.config` is a Chinese-CLIP's (the towers are `model.text` and `model.image`)."""
        return {f"model.{key}": "the chinese-clip family's; the towers here are model.text and model.image"
                for key in self.changed_settings(cfg, ("config",))}

    @classmethod
    def create(cls, cfg: ModelConfig, vocab_size: int | None = None) -> DualEncoder:
        import timm
        from transformers import AutoModel, BertConfig, BertModel

        text_cfg, image_cfg = cfg.text, cfg.image
        if text_cfg.name:
            text = load_pretrained(AutoModel, text_cfg.name, "text tower", add_pooling_layer=False)
        else:
            conf = dict(text_cfg.config)
            if vocab_size:
                conf["vocab_size"] = vocab_size
            text = BertModel(BertConfig(**conf), add_pooling_layer=False)
        kwargs = dict(image_cfg.kwargs)
        if image_cfg.checkpoint:
            kwargs["pretrained_cfg_overlay"] = {"file": image_cfg.checkpoint}
        image = timm.create_model(image_cfg.name, pretrained=image_cfg.pretrained or bool(image_cfg.checkpoint),
                                  num_classes=0, **kwargs)
        arch = {"text_config": text.config.to_dict(), "text_model_type": text.config.model_type,
                "image_name": image_cfg.name, "image_kwargs": dict(image_cfg.kwargs), "pooling": text_cfg.pooling,
                "embed_dim": cfg.embed_dim, "head": cfg.head, "head_dropout": cfg.head_dropout,
                "mean": tuple(image.pretrained_cfg.get("mean", CLIP_MEAN)),
                "std": tuple(image.pretrained_cfg.get("std", CLIP_STD)),
                "inverse_temperature_max": cfg.inverse_temperature_max}
        return cls(text, image, arch, cfg.inverse_temperature_init)

    @classmethod
    def from_arch(cls, arch: dict) -> DualEncoder:
        import timm
        from transformers import AutoConfig, AutoModel

        conf = {k: v for k, v in arch["text_config"].items() if k != "model_type"}
        text = AutoModel.from_config(AutoConfig.for_model(arch["text_model_type"], **conf), add_pooling_layer=False)
        image = timm.create_model(arch["image_name"], pretrained=False, num_classes=0, **arch["image_kwargs"])
        return cls(text, image, {k: v for k, v in arch.items() if k != "family"})

    @property
    def text_tower(self):
        return self.text

    def tower_modules(self, kind: str) -> tuple[nn.Module, ...]:
        return (self.text, self.pool, self.text_proj) if kind == "text" else (self.image, self.image_proj)

    def tower_shape(self, kind: str) -> dict | None:
        conf = self.arch["text_config"]
        if kind != "text" or self.arch.get("text_model_type") not in ("bert", "roberta"):
            return None  # a timm image tower: no pattern ONNX Runtime fuses
        return {"model_type": "bert", "num_heads": int(conf["num_attention_heads"]),
                "hidden_size": int(conf["hidden_size"]), "layers": int(conf["num_hidden_layers"])}

    def set_mask_ratio(self, ratio: float) -> None:
        """A timm ViT tower masks with its own patch dropout (active in training only); a CNN has
        no patch tokens to drop."""
        from timm.layers import PatchDropout

        if not hasattr(self.image, "patch_drop"):
            if ratio:
                raise ValueError(flip_refusal(ImageTower(self.arch["image_name"])))
            return
        super().set_mask_ratio(ratio)
        prefix = getattr(self.image, "num_prefix_tokens", 1)
        self.image.patch_drop = PatchDropout(ratio, num_prefix_tokens=prefix) if ratio else nn.Identity()

    def encode_text(self, input_ids, attention_mask):
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_proj(self.pool(hidden, attention_mask)), dim=-1)

    def encode_image(self, pixels):
        return F.normalize(self.image_proj(self.image(self.pixels(pixels))), dim=-1)

    def lora_targets(self, kind: str, which: str | None = None) -> list[str]:
        """A BERT text tower's layers as Chinese-CLIP's text tower's; a timm ViT's: its fused qkv
        projection (so `qv` adapts the key too), then `proj` and the MLP's `fc1`, `fc2`. A CNN
        has none: it trains as configured. By default every Linear layer, as Chinese-CLIP's family
        (measured there; this family's towers were not swept)."""
        image = {"qv": ["qkv"], "attention": ["qkv", "attn.proj"], "all-linear": ["qkv", "attn.proj", "fc1", "fc2"]}
        return BERT_LORA_TARGETS[which or "all-linear"] if kind == "text" else image[which or "all-linear"]

    def tower_blocks(self, kind: str) -> list[nn.Module]:
        """The text tower's layers; a timm ViT's blocks ([] for a CNN, whose stages differ)."""
        return list(self.text.encoder.layer) if kind == "text" else list(getattr(self.image, "blocks", []))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        checkpoint_activations(self.text, enable)
        self.image.set_grad_checkpointing(enable)

    def param_layout(self, coarse: bool = False) -> Layout:
        """Text: the transformer layout. Image: timm's own group matcher, by block (or by stage
        when `coarse`, as freezing wants); a last group of final norms/heads only counts as top + 1."""
        from timm.models import group_parameters

        layout = transformer_layout([n for n, _ in self.named_parameters()], "text.", "text")
        groups = group_parameters(self.image, self.image.group_matcher(coarse=coarse))
        ordered = sorted(groups)
        last = groups[ordered[-1]]
        final_only = len(ordered) > 1 and all(n.split(".")[0] in ("head", "norm", "fc_norm", "final_conv")
                                              for n in last)
        top = len(ordered) - (2 if final_only else 1)
        for rank, gid in enumerate(ordered):
            for n in groups[gid]:
                layout["image." + n] = ("image", rank, top)
        return with_head_group(self, layout)
