"""The chinese-clip family: `transformers.ChineseCLIPModel`, fine-tuned end to end with its own
projections, from a hub name, a `transformers` directory, a cn_clip checkpoint file
(`model.cnclip`) or random from a config. Its model goes out as a `transformers` directory
(`--format hf`) and in Chinese-CLIP's own checkpoint format (`--format cnclip`); published weights
come with Chinese-CLIP's preprocessing (`published_preprocessing`)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .cnclip import CNCLIP_FORMAT
from .config import CHECKPOINT_SUFFIXES, ConfigError, ModelConfig, Preprocessing
from .family import Layout, RetrievalModel, checkpoint_activations, transformer_layout, with_head_group
from .layers import BERT_LORA_TARGETS, CLIP_MEAN, CLIP_STD, PixelNormalize, random_masking
from .weights import WEIGHT_SUFFIXES, hub_source, load_pretrained

DUAL_KEYS = ("text.name", "text.config", "text.pooling", "image.name", "image.pretrained", "image.checkpoint",
             "image.kwargs", "embed_dim", "head", "head_dropout")  # model keys only the dual family reads
CONTEXT_LENGTH = 52  # Chinese-CLIP's text length
VIT_LORA_TARGETS = {"qv": ["q_proj", "v_proj"], "attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
                    "all-linear": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}  # a CLIP ViT's layers


class ChineseCLIPEncoder(RetrievalModel):
    family = "chinese-clip"

    def __init__(self, clip: nn.Module, inverse_temperature_max: float, source: dict | None = None):
        super().__init__()
        self.clip = clip
        self.pixels = PixelNormalize(CLIP_MEAN, CLIP_STD)
        self.inverse_temperature_max = inverse_temperature_max
        self.arch = {"clip_config": clip.config.to_dict(), "inverse_temperature_max": inverse_temperature_max}
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
        asked (`model.factory.load_model`), not at every model creation: each training start on each rank
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

    def tower_blocks(self, kind: str) -> list[nn.Module]:
        tower = self.clip.text_model.encoder.layer if kind == "text" else self.clip.vision_model.encoder.layers
        return list(tower)

    def tower_shape(self, kind: str) -> dict | None:
        key, model_type = ("text_config", "bert") if kind == "text" else ("vision_config", "clip")
        conf = self.arch["clip_config"][key]
        return {"model_type": model_type, "num_heads": int(conf["num_attention_heads"]),
                "hidden_size": int(conf["hidden_size"]), "layers": int(conf["num_hidden_layers"])}

    @staticmethod
    def tokenizer_source(cfg: ModelConfig) -> str | None:
        return cfg.name

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        """Attention heads are read only for a cn_clip checkpoint file (its tensors cannot tell them)."""
        heads = cfg.attention_heads
        if heads is not None and not (cfg.name and (os.path.isfile(cfg.name) or cfg.name.endswith(
                CHECKPOINT_SUFFIXES))):
            raise ConfigError(f"model.attention_heads={heads!r} is read only from a Chinese-CLIP checkpoint file "
                              "(model.name: X.pt), whose tensors cannot tell the heads; a random Chinese-CLIP takes "
                              "them from model.config (vision_config / text_config num_attention_heads), a hub name "
                              "or transformers directory from its config.json: remove model.attention_heads")

    @classmethod
    def starts_from_weights(cls, cfg: ModelConfig) -> bool:
        return bool(cfg.name)

    @property
    def exact_vocabulary(self) -> bool:
        """A cn_clip file's vocabulary is known (the installed cn_clip's), so a tokenizer of another
        size is refused rather than warned about."""
        return (self.source or {}).get("format") == CNCLIP_FORMAT

    def published_preprocessing(self, max_text_length: int | None = None) -> Preprocessing:
        """How Chinese-CLIP's published weights take their inputs: the vision tower's own image
        size, squashed (as the organisers' 224 x 224 images), 52 tokens (or fewer, where the text
        tower has fewer positions), Chinese-CLIP's text normalisation."""
        positions = self.clip.config.text_config.max_position_embeddings
        return Preprocessing(image_size=self.image_size, resize_rule="squash", text_normalization="cn-clip",
                             max_text_length=int(max_text_length or min(CONTEXT_LENGTH, positions)))

    def ignored_settings(self, cfg: ModelConfig) -> dict[str, str]:
        """The dual family's tower and head keys (Chinese-CLIP brings its own), and the multiplier's
        start (its weights', or `model.config`'s logit_scale_init_value)."""
        notes = {f"model.{key}": "the dual family's; Chinese-CLIP's towers and projections are its own"
                 for key in self.changed_settings(cfg, DUAL_KEYS)}
        if self.changed_settings(cfg, ("inverse_temperature_init",)):
            notes["model.inverse_temperature_init"] = (f"the multiplier starts at the model's own exp(logit_scale) = "
                                                       f"{float(self.logit_scale.detach().exp()):.4g}")
        return notes

    @classmethod
    def create(cls, cfg: ModelConfig, vocab_size: int | None = None) -> ChineseCLIPEncoder:
        """From `cfg.name`: a Chinese-CLIP checkpoint file of `cn_clip`'s (`model.cnclip`), a
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
            if vocab_size:  # (a copy: the config's own mapping stays as it was)
                conf["text_config"] = {**conf.get("text_config", {}), "vocab_size": vocab_size}
            clip, source = ChineseCLIPModel(ChineseCLIPConfig(**conf)), None
        return cls(clip, cfg.inverse_temperature_max, source)

    @classmethod
    def from_arch(cls, arch: dict) -> ChineseCLIPEncoder:
        from transformers import ChineseCLIPConfig, ChineseCLIPModel

        return cls(ChineseCLIPModel(ChineseCLIPConfig(**arch["clip_config"])), arch["inverse_temperature_max"])

    @staticmethod
    def _features(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers >= 5 returns an output

    def encode_text(self, input_ids, attention_mask):
        out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self._features(out), dim=-1)

    def encode_image(self, pixels):
        return F.normalize(self._features(self.clip.get_image_features(pixel_values=self.pixels(pixels))), dim=-1)

    def transformers_out(self, tokenizer_file: str, preprocessing: Preprocessing):
        """`ChineseCLIPModel` itself, and a `ChineseCLIPProcessor`: the run's tokenizer as a
        `BertTokenizerFast`, its image size and resize rule (bicubic, CLIP's mean and std)."""
        from tokenizers import Tokenizer
        from transformers import BertTokenizerFast, ChineseCLIPImageProcessor, ChineseCLIPProcessor

        data = preprocessing
        fast = BertTokenizerFast(tokenizer_object=Tokenizer.from_file(tokenizer_file), unk_token="[UNK]",
                                 pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                 model_max_length=data.max_text_length)
        square = {"height": data.image_size, "width": data.image_size}
        images = ChineseCLIPImageProcessor(size=square if data.resize_rule == "squash" else {
            "shortest_edge": data.image_size}, crop_size=square, do_center_crop=data.resize_rule != "squash",
            resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))  # 3: bicubic
        return self.clip, ChineseCLIPProcessor(image_processor=images, tokenizer=fast)

    def cnclip_state_dict(self) -> dict[str, torch.Tensor]:
        """Chinese-CLIP's layout of these weights (`model.cnclip.from_hf_state_dict`, the exact inverse
        of its reader: the round trip is checked bit for bit); a CheckpointError naming the fields
        where cn_clip's `CLIP` cannot build this shape."""
        from .cnclip import cnclip_mismatch, from_hf_state_dict, to_hf_state_dict
        from .weights import CheckpointError

        mismatch = cnclip_mismatch(self.clip.config)
        if mismatch:
            raise CheckpointError(f"cn_clip's code cannot build this model: {mismatch}; write it as --format hf (or "
                                  "the ONNX bundle) instead")
        ours = self.clip.state_dict()
        state = from_hf_state_dict(ours)
        back = to_hf_state_dict(state)  # the mapping is a bijection: nothing lost, nothing invented
        if back.keys() != ours.keys() or not all(torch.equal(back[k], ours[k]) for k in ours):
            raise CheckpointError("the Chinese-CLIP layout of this model does not map back onto it exactly")
        return state

    def lora_targets(self, kind: str, which: str | None = None) -> list[str]:
        """By default every Linear layer of both towers: the cheapest setting within 1 MR of the best
        in `muge bench lora --sweep` (docs/benchmarks.md), well ahead of query and value alone."""
        return (BERT_LORA_TARGETS if kind == "text" else VIT_LORA_TARGETS)[which or "all-linear"]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        checkpoint_activations(self.clip, enable)

    def param_layout(self, coarse: bool = False) -> Layout:
        """Both towers are transformers (`coarse` changes nothing)."""
        names = [n for n, _ in self.named_parameters()]
        layout = {**transformer_layout(names, "clip.text_model.", "text"),
                  **transformer_layout(names, "clip.vision_model.", "image")}
        return with_head_group(self, layout)
