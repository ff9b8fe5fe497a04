"""The interface every model family implements: `RetrievalModel`, an abstract base listing each
method and attribute that training, evaluation, export and the benches call. A new family is one
file with one subclass that names itself (`family = "..."`): defining it registers it in
`FAMILIES`, which `model.family` is checked against; `dual.py` and `chinese_clip.py` are the two.
Instantiating one that leaves a method out fails. Nothing outside `model/` asks which family a
model is: whatever depends on it is asked of the model.

What a family owns: its config's checks (`check_config`, `check_mask_ratio`, `ignored_settings`,
`starts_from_weights`); how it is created from a config (`create`) and rebuilt offline without
weights from its plain `arch` record (`to_arch` / `from_arch`); its two encoders and its learned
logit scale; its towers (for export's fusion and release, and their blocks); its parameter
layout for layer-wise lr decay and freezing (`param_layout`); gradient checkpointing; FLIP
masking; LoRA's default targets (`lora_targets`); where its tokenizer comes from and whether its
vocabulary is known exactly; and the formats it can be written in besides the ONNX bundle
(`transformers_out` for `--format hf`, `cnclip_state_dict` for `--format cnclip`).
"""
from __future__ import annotations

import math
import re
from abc import ABCMeta, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from .config import ConfigError, ModelConfig, Preprocessing

Layout = dict[str, tuple[str, int, int]]  # parameter name -> (group, layer id, top block id)
FAMILIES: dict[str, type[RetrievalModel]] = {}  # `model.family` name -> its class: each registers itself


class RetrievalModel(nn.Module, metaclass=ABCMeta):
    """A text-image retrieval model: L2-normalised embeddings of both kinds and the log of the
    multiplier their cosine similarities are scaled by in the contrastive loss."""

    family: ClassVar[str]              # its `model.family` name
    arch: dict                         # what `from_arch` rebuilds it from (less `family`, which `to_arch` adds)
    logit_scale: torch.Tensor          # the learned log of the similarity's multiplier (CLIP's name for it)
    inverse_temperature_max: float     # the multiplier's clamp (`clamp_logit_scale`): exp(logit_scale) at most
    image_size: int | None = None      # a vision tower's fixed input size (a ViT's position grid); None: any size
    source: dict | None = None         # the pretrained weights it was created from (None: a random start)
    mask_ratio = 0.0                   # FLIP patch masking in training (`set_mask_ratio`); evaluation never masks

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "family" in vars(cls):  # a family names itself, and is registered by being defined
            FAMILIES[cls.family] = cls

    # -- its config ------------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        """Refuse, with a ConfigError naming the key, what the field types cannot say of the model
        section for this family (before any weights are fetched). By default: the attention heads
        only a Chinese-CLIP checkpoint file needs."""
        if cfg.attention_heads is not None:
            raise ConfigError(f"model.attention_heads={cfg.attention_heads!r} is read only from a Chinese-CLIP "
                              "checkpoint file (model.family=chinese-clip, model.name: X.pt), whose tensors cannot "
                              f"tell the heads; the {cls.family} family does not read it: remove model.attention_heads")

    @classmethod
    def check_mask_ratio(cls, cfg: ModelConfig) -> None:
        """Refuse FLIP masking (a ratio above 0 somewhere in the schedule) where this config's image
        tower has no patch tokens to drop: a ConfigError, before any weights are fetched."""

    @classmethod
    @abstractmethod
    def starts_from_weights(cls, cfg: ModelConfig) -> bool:
        """Whether the config loads pretrained weights into some tower (rather than a random start)."""

    def ignored_settings(self, cfg: ModelConfig) -> dict[str, str]:
        """Keys of the model section set away from their defaults that this family does not read,
        each with what it uses instead (a warning at training's start); {} by default."""
        return {}

    @staticmethod
    def changed_settings(cfg: ModelConfig, keys: tuple[str, ...]) -> list[str]:
        """Those of the dotted `keys` (`text.name`) whose value in `cfg` is not the default's."""
        default = ModelConfig()

        def value(obj, key):
            for part in key.split("."):
                obj = getattr(obj, part)
            return obj

        return [key for key in keys if value(cfg, key) != value(default, key)]

    # -- building -------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def create(cls, cfg: ModelConfig, vocab_size: int | None = None) -> RetrievalModel:
        """From the config's model section, loading the weights it names; `vocab_size`: the rows
        of a random text tower's embedding (the run's tokenizer's)."""

    @classmethod
    @abstractmethod
    def from_arch(cls, arch: dict) -> RetrievalModel:
        """The architecture of `arch` (`to_arch`'s record) with random weights, offline."""

    @staticmethod
    @abstractmethod
    def tokenizer_source(cfg: ModelConfig) -> str | None:
        """Where the model's own tokenizer comes from (a hub name, a directory, a cn_clip file), or None."""

    def to_arch(self) -> dict:
        return {"family": self.family, **self.arch}

    def weights_source(self) -> dict | None:
        """`source`, as the bundle's manifest records it (a family may add hashes of local files)."""
        return self.source

    @property
    def exact_vocabulary(self) -> bool:
        """Whether the weights' vocabulary is known exactly (a tokenizer of another size is then
        refused rather than warned about); False by default."""
        return False

    # -- the model out, besides the ONNX bundle --------------------------------------------------------
    def transformers_out(self, tokenizer_file: str, preprocessing: Preprocessing):
        """(this model as a `transformers` model, its processor for the run's tokenizer file and
        preprocessing): what `--format hf` saves with `save_pretrained`; None where the family has
        no `transformers` class."""
        return None

    def cnclip_state_dict(self) -> dict[str, torch.Tensor] | None:
        """This model's weights in Chinese-CLIP's checkpoint layout (cn_clip's names), what
        `--format cnclip` writes; None where the family has no such layout, a CheckpointError where
        cn_clip's own code cannot build this model's shape."""
        return None

    # -- encoding -------------------------------------------------------------------------------------
    @abstractmethod
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """int64 [batch, length] ids and mask -> L2-normalised [batch, embed dim]."""

    @abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [batch, height, width, 3] (resized by `competition.preprocess`) -> L2-normalised
        [batch, embed dim]; the normalisation to the tower's mean and std happens inside."""

    def forward(self, pixels, input_ids, attention_mask):
        """(image features, text features, logit scale): the call DDP wraps."""
        return self.encode_image(pixels), self.encode_text(input_ids, attention_mask), self.logit_scale

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(0, math.log(self.inverse_temperature_max))

    # -- towers ---------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def text_tower(self) -> nn.Module:
        """The text transformer (a `transformers` model: `get_input_embeddings()`)."""

    @abstractmethod
    def tower_modules(self, kind: str) -> tuple[nn.Module, ...]:
        """Every module one tower (`text` | `image`) runs, its projection included."""

    def tower_blocks(self, kind: str) -> list[nn.Module]:
        """The repeated blocks of tower `kind` (a transformer's layers), in order: what gradient
        checkpointing recomputes one at a time; [] where the family cannot name them."""
        return []

    @abstractmethod
    def tower_shape(self, kind: str) -> dict | None:
        """{model_type (bert | clip), num_heads, hidden_size, layers} of a transformer tower, for
        ONNX Runtime's fusion at export; None for one it has no pattern for (a CNN)."""

    def release_tower(self, kind: str) -> None:
        """Free the weights of one tower (`text` | `image`), moved to the meta device: an export
        that has written a tower's graph needs them no more, and at ViT-H/14 they are gigabytes."""
        for module in self.tower_modules(kind):
            module.to("meta")

    @property
    def text_vocab_rows(self) -> int:
        """Rows of the text tower's token embedding: the ids a tokenizer may emit."""
        return self.text_tower.get_input_embeddings().num_embeddings

    # -- training -------------------------------------------------------------------------------------
    @abstractmethod
    def lora_targets(self, kind: str, which: str | None = None) -> list[str]:
        """`train.lora.targets`' named set `which` in tower `kind` (text | image), as name suffixes:
        qv (attention query and value), attention (every attention projection), all-linear (every
        Linear layer); None: the family's default set. A tower with none of them (a CNN) gets no
        adapters."""

    @abstractmethod
    def param_layout(self, coarse: bool = False) -> Layout:
        """Every parameter's (group: text | image | head, layer id, top layer id): layer-wise lr
        decay and freezing read it; `coarse` groups an image tower by stage rather than block."""

    @abstractmethod
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (or, `enable=False`, keep them again)."""

    def set_mask_ratio(self, ratio: float) -> None:
        """FLIP: drop this share of image patches in training (a ValueError where the tower has none)."""
        self.mask_ratio = float(ratio)


_LAYER = re.compile(r"\.layers?\.(\d+)\.")


def transformer_layout(names: list[str], prefix: str, group: str) -> Layout:
    """A Hugging Face transformer tower: embeddings 0, layer i -> i + 1, anything above the last
    layer (final norms) top + 1."""
    members = [n for n in names if n.startswith(prefix)]
    ids = {n: int(m.group(1)) + 1 for n in members if (m := _LAYER.search(n[len(prefix) - 1:]))}
    top = max(ids.values(), default=0)
    layout = {}
    for n in members:
        is_stem = "embeddings" in n or "pre_layrnorm" in n
        layout[n] = (group, ids.get(n, 0 if is_stem else top + 1), top)
    return layout


def checkpoint_activations(model, enable: bool = True) -> None:
    """Gradient checkpointing of a transformers model on (or off), as its version names it."""
    verb = "enable" if enable else "disable"
    switch = getattr(model, f"activation_checkpointing_{verb}", None) or getattr(model,
                                                                                 f"gradient_checkpointing_{verb}")
    switch()


def with_head_group(model: nn.Module, layout: Layout) -> Layout:
    for n, _ in model.named_parameters():  # projections, pooling, logit scale
        layout.setdefault(n, ("head", 0, 0))
    return layout
