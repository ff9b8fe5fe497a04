"""Retrieval models: one interface (`encode_text`, `encode_image`, `logit_scale`) for two families.

dual          a Hugging Face text tower (BERT-like) with cls | mean | mean_max | attentive pooling,
              a timm image tower (num_classes=0), linear or MLP projection heads.
chinese-clip  `transformers.ChineseCLIPModel`, fine-tuned end to end with its own projections.

Images enter as uint8 [batch, height, width, 3] (already resized by
`competition.preprocess.resize_image`); cast, scaling, mean/std and transpose happen in
`PixelNormalize`, so the exported ONNX graph contains them too.

Each family is one class that owns what differs: how it is created from a config (`create`), the
plain `arch` dict from which it is rebuilt offline without weights (`to_arch` / `from_arch`),
its parameter layout for layer-wise lr decay and freezing (`param_layout`), gradient
checkpointing, the logit-scale clamp, and where its tokenizer comes from. A new family is one
more class registered in `FAMILIES`.
"""
from __future__ import annotations

import math
import os
import re
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, WeightsError, mismatch
from .config import Head, ModelConfig, Pooling, flip_refusal

Layout = dict[str, tuple[str, int, int]]  # parameter name -> (group, layer id, top block id)

POOLINGS = get_args(Pooling)  # the config schema names the choices; the model implements each
HEADS = get_args(Head)
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
        if kind not in POOLINGS:
            raise ValueError(f"unknown text pooling {kind!r}; expected one of {', '.join(POOLINGS)}")
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
    if kind not in HEADS:
        raise ValueError(f"unknown projection head {kind!r}; expected one of {', '.join(HEADS)}")
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.LayerNorm(in_dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(in_dim, out_dim))


def _hf_kwargs(name: str) -> dict:
    # a local directory never touches the network
    return {"local_files_only": True} if os.path.isdir(name) else {}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


def hub_source(name: str, model) -> dict:
    """{"pretrained": name, "revision": ...} for a hub name, {"pretrained": the directory} for a
    local one (whose files `ChineseCLIPEncoder.weights_source` hashes when asked)."""
    if os.path.isdir(name):
        return {"pretrained": os.path.abspath(name)}
    return {"pretrained": name, "revision": getattr(model.config, "_commit_hash", None)}


def load_pretrained(cls, name: str, what: str, **kwargs):
    """`cls.from_pretrained(name)`, refusing weights that do not fill the architecture exactly: a
    missing or mis-shaped tensor would be left at its random start, and an unexpected one means
    the weights belong to another model. (A BERT pooler, which no encoder here uses, may be left.)"""
    if os.path.isfile(name):
        raise WeightsError(f"{name}: a file; {what} weights here are a hub name or a directory (config.json beside "
                           "model.safetensors or pytorch_model.bin)")
    try:
        model, info = cls.from_pretrained(name, output_loading_info=True, **_hf_kwargs(name), **kwargs)
    except Exception as exc:  # OSError (not found, no network), safetensors / pickle / JSON errors, size mismatches
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise WeightsError(f"{name}: cannot load {what} weights ({type(exc).__name__}: {reason})") from None
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.split(".", 1)[-1].startswith("pooler.")
                        and not k.startswith("pooler."))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    if missing or unexpected or mismatched:
        raise WeightsError(f"{name}: these weights do not fit a {what} model: "
                           f"{mismatch(missing, unexpected, mismatched)}. They are another architecture's; refused "
                           "rather than trained from a partly random start")
    return model


_LAYER = re.compile(r"\.layers?\.(\d+)\.")


def _transformer_layout(names: list[str], prefix: str, group: str) -> Layout:
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


def _checkpoint_activations(model) -> None:
    """Gradient checkpointing of a transformers model (renamed in transformers 5)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def _with_head_group(model: nn.Module, layout: Layout) -> Layout:
    for n, _ in model.named_parameters():  # projections, pooling, logit scale
        layout.setdefault(n, ("head", 0, 0))
    return layout


def random_masking(tokens: torch.Tensor, ratio: float) -> torch.Tensor:
    """FLIP: keep the class token and a random `int((L - 1) * (1 - ratio))` of the patch tokens of
    each image, drawn exactly as Chinese-CLIP draws them (cn_clip/clip/model.py
    `VisualTransformer.random_masking`: `torch.rand` noise on the tokens' device, argsort, the first
    ones kept, in that order)."""
    n, length, dim = tokens.shape
    keep = int((length - 1) * (1 - ratio))
    noise = torch.rand(n, length - 1, device=tokens.device)
    ids = torch.argsort(noise, dim=1)[:, :keep] + 1
    kept = torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, dim))
    return torch.cat([tokens[:, :1], kept], dim=1)


class RetrievalModel(nn.Module):
    """What the training loop, export and the optimizer ask of every family."""

    family: str
    arch: dict
    logit_scale_max: float

    def forward(self, pixels, input_ids, attention_mask):
        """(image features, text features, log logit scale): the call DDP wraps."""
        return self.encode_image(pixels), self.encode_text(input_ids, attention_mask), self.logit_scale

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(0, math.log(self.logit_scale_max))

    def to_arch(self) -> dict:
        return {"family": self.family, **self.arch}

    mask_ratio = 0.0  # FLIP patch masking in training (`set_mask_ratio`); evaluation never masks

    def set_mask_ratio(self, ratio: float) -> None:
        self.mask_ratio = float(ratio)

    def release_tower(self, kind: str) -> None:
        """Free the weights of one tower (`text` | `image`), moved to the meta device: an export
        that has written a tower's graph needs them no more, and at ViT-H/14 they are gigabytes."""
        for module in self.tower_modules(kind):
            module.to("meta")

    @property
    def text_vocab_rows(self) -> int:
        """Rows of the text tower's token embedding: the ids a tokenizer may emit."""
        return self.text_tower.get_input_embeddings().num_embeddings


class DualEncoder(RetrievalModel):
    family = "dual"

    def __init__(self, text: nn.Module, image: nn.Module, arch: dict, logit_scale_init: float = 1.0):
        super().__init__()
        self.arch, self.logit_scale_max = arch, arch["logit_scale_max"]
        self.text = text
        self.image = image
        self.pool = TextPool(arch["pooling"], text.config.hidden_size)
        self.text_proj = projection_head(arch["head"], self.pool.out_dim, arch["embed_dim"], arch["head_dropout"])
        self.image_proj = projection_head(arch["head"], image.num_features, arch["embed_dim"], arch["head_dropout"])
        self.pixels = PixelNormalize(arch["mean"], arch["std"])
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))

    @staticmethod
    def tokenizer_source(cfg: ModelConfig) -> str | None:
        return cfg.text.name

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
                "std": tuple(image.pretrained_cfg.get("std", CLIP_STD)), "logit_scale_max": cfg.logit_scale_max}
        return cls(text, image, arch, cfg.logit_scale_init)

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

    def set_mask_ratio(self, ratio: float) -> None:
        """A timm ViT tower masks with its own patch dropout (active in training only); a CNN has
        no patch tokens to drop."""
        from timm.layers import PatchDropout

        if not hasattr(self.image, "patch_drop"):
            if ratio:
                raise ValueError(flip_refusal(self.arch["image_name"]))
            return
        super().set_mask_ratio(ratio)
        prefix = getattr(self.image, "num_prefix_tokens", 1)
        self.image.patch_drop = PatchDropout(ratio, num_prefix_tokens=prefix) if ratio else nn.Identity()

    def encode_text(self, input_ids, attention_mask):
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.text_proj(self.pool(hidden, attention_mask)), dim=-1)

    def encode_image(self, pixels):
        return F.normalize(self.image_proj(self.image(self.pixels(pixels))), dim=-1)

    def set_grad_checkpointing(self) -> None:
        _checkpoint_activations(self.text)
        self.image.set_grad_checkpointing(True)

    def param_layout(self, coarse: bool = False) -> Layout:
        """Text: the transformer layout. Image: timm's own group matcher, by block (or by stage
        when `coarse`, as freezing wants); a last group of final norms/heads only counts as top + 1."""
        from timm.models import group_parameters

        layout = _transformer_layout([n for n, _ in self.named_parameters()], "text.", "text")
        groups = group_parameters(self.image, self.image.group_matcher(coarse=coarse))
        ordered = sorted(groups)
        last = groups[ordered[-1]]
        final_only = len(ordered) > 1 and all(n.split(".")[0] in ("head", "norm", "fc_norm", "final_conv")
                                              for n in last)
        top = len(ordered) - (2 if final_only else 1)
        for rank, gid in enumerate(ordered):
            for n in groups[gid]:
                layout["image." + n] = ("image", rank, top)
        return _with_head_group(self, layout)


class ChineseCLIPEncoder(RetrievalModel):
    family = "chinese-clip"

    def __init__(self, clip: nn.Module, logit_scale_max: float, source: dict | None = None):
        super().__init__()
        self.clip = clip
        self.pixels = PixelNormalize(CLIP_MEAN, CLIP_STD)
        self.logit_scale_max = logit_scale_max
        self.arch = {"clip_config": clip.config.to_dict(), "logit_scale_max": logit_scale_max}
        self.source = source  # what pretrained weights were loaded (None: a random start); see weights_source
        # FLIP, where Chinese-CLIP masks: after the position embedding, before the pre-norm
        clip.vision_model.embeddings.register_forward_hook(self._mask_patches)

    def _mask_patches(self, module, args, tokens):
        if self.training and self.mask_ratio:
            return random_masking(tokens, self.mask_ratio)
        return None

    def weights_source(self) -> dict | None:
        """`source` with the sha256 of the local weights it names (a cn_clip file, or each weight
        file of a directory): exactly which weights were loaded, for the manifest. Hashed only when
        asked (`train.pretrained`), not at every model creation: each training start on each rank
        would read gigabytes for nothing."""
        from infra.io import sha256

        if self.source is None or "revision" in self.source:  # a random start, or a hub revision
            return self.source
        path = self.source["pretrained"]
        if os.path.isfile(path):
            return {**self.source, "sha256": sha256(path)}
        files = sorted(f for f in os.listdir(path) if f.endswith(WEIGHT_SUFFIXES))
        return {**self.source, "files": {f: sha256(os.path.join(path, f)) for f in files}}

    @property
    def image_size(self) -> int:
        """The vision tower's own input size (its position embedding's grid)."""
        return int(self.clip.config.vision_config.image_size)

    @property
    def logit_scale(self):
        return self.clip.logit_scale

    @property
    def text_tower(self):
        return self.clip.text_model

    def tower_modules(self, kind: str) -> tuple[nn.Module, ...]:
        clip = self.clip
        return (clip.text_model, clip.text_projection) if kind == "text" else (clip.vision_model,
                                                                               clip.visual_projection)

    @staticmethod
    def tokenizer_source(cfg: ModelConfig) -> str | None:
        return cfg.name

    @classmethod
    def create(cls, cfg: ModelConfig, vocab_size: int | None = None) -> ChineseCLIPEncoder:
        """From `cfg.name`: a Chinese-CLIP checkpoint file of `cn_clip`'s (`train.cnclip`), a
        `transformers` directory or hub name; or random from `cfg.config`."""
        from transformers import ChineseCLIPConfig, ChineseCLIPModel

        if cfg.name and os.path.isfile(cfg.name):
            from .cnclip import load_cnclip

            heads = dict(zip(("vision", "text"), cfg.attention_heads or ()))  # what its tensors cannot tell
            clip, source = load_cnclip(cfg.name, heads)
        elif cfg.name:
            clip = load_pretrained(ChineseCLIPModel, cfg.name, "Chinese-CLIP")
            source = hub_source(cfg.name, clip)
        else:
            conf = dict(cfg.config)
            if vocab_size:
                conf.setdefault("text_config", {})["vocab_size"] = vocab_size
            clip, source = ChineseCLIPModel(ChineseCLIPConfig(**conf)), None
        return cls(clip, cfg.logit_scale_max, source)

    @classmethod
    def from_arch(cls, arch: dict) -> ChineseCLIPEncoder:
        from transformers import ChineseCLIPConfig, ChineseCLIPModel

        return cls(ChineseCLIPModel(ChineseCLIPConfig(**arch["clip_config"])), arch["logit_scale_max"])

    @staticmethod
    def _features(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers >= 5 returns an output

    def encode_text(self, input_ids, attention_mask):
        out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self._features(out), dim=-1)

    def encode_image(self, pixels):
        return F.normalize(self._features(self.clip.get_image_features(pixel_values=self.pixels(pixels))), dim=-1)

    def set_grad_checkpointing(self) -> None:
        _checkpoint_activations(self.clip)

    def param_layout(self, coarse: bool = False) -> Layout:
        """Both towers are transformers (`coarse` changes nothing)."""
        names = [n for n, _ in self.named_parameters()]
        layout = {**_transformer_layout(names, "clip.text_model.", "text"),
                  **_transformer_layout(names, "clip.vision_model.", "image")}
        return _with_head_group(self, layout)


FAMILIES = {cls.family: cls for cls in (DualEncoder, ChineseCLIPEncoder)}


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
    try:
        return FAMILIES[arch["family"]].from_arch(arch)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its architecture record cannot be rebuilt ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from None
