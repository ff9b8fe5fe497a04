"""Chinese-CLIP's own checkpoint files (`cn_clip`), read into `transformers`' `ChineseCLIPModel`.

Takes the released `clip_cn_vit-*.pt` files and the checkpoints `cn_clip/training/main.py` writes
(`{"epoch", "step", "name", "state_dict", "optimizer"}`, keys prefixed `module.` by DDP). The
architecture is read from the tensors' shapes:

    vision   width, patch  visual.conv1.weight            [width, 3, patch, patch]
             image size    visual.positional_embedding    [(size / patch)^2 + 1, width]
             layers        visual.transformer.resblocks.N.*
             heads         width / 64, or / 80 for width 1280 (cn_clip/clip/model_configs/ViT-H-14.json)
    text     vocab, width  bert.embeddings.word_embeddings.weight  [vocab, width]
             layers        bert.encoder.layer.N.*;  heads = width / 64 (every RoBERTa config it ships)
    both     embed dim     visual.proj [width, dim] and text_projection [width, dim]

The mapping of every tensor to `ChineseCLIPModel`'s is below (`to_hf_state_dict`), and it is
complete: a tensor it does not know (another model's checkpoint) is refused, as is a ResNet
vision tower (RN50), which `transformers` has no Chinese-CLIP class for. Files load with
`torch.load(weights_only=True)`: nothing in them can run code.
"""
from __future__ import annotations

import logging
import os
import re

import torch

from competition.errors import first_of

from .weights import CheckpointError, WeightsError, is_torch_zip, load_weights, safe_load

log = logging.getLogger(__name__)

CNCLIP_FORMAT = "cn_clip checkpoint"  # `source["format"]` of weights read from a cn_clip file
CNCLIP_MAX_CHARS_PER_WORD = 200  # cn_clip/clip/bert_tokenizer.py WordpieceTokenizer
VISION_HEAD_WIDTH = {1280: 80}   # ViT-H/14; every other published width has 64-wide heads
TEXT_HEAD_WIDTH = 64
# ViT names as Chinese-CLIP publishes them, by (width, layers, patch, image size)
PUBLISHED = {(768, 12, 16, 224): "ViT-B-16", (768, 12, 32, 224): "ViT-B-32", (1024, 24, 14, 224): "ViT-L-14",
             (1024, 24, 14, 336): "ViT-L-14-336", (1280, 32, 14, 224): "ViT-H-14"}


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a cn_clip file, `module.` prefixes removed."""
    zipped = is_torch_zip(path)
    with open(path, "rb") as f:
        legacy = f.read(1) == b"\x80"  # a pickle, as torch wrote before its zip format
    if not (zipped or legacy):
        raise WeightsError(f"{path}: not a Chinese-CLIP checkpoint file (a torch .pt); weights are a hub name, a "
                           "transformers directory, or a cn_clip .pt file")
    try:  # torch's zip format is memory-mapped: the model takes its tensors without a second copy
        obj = safe_load(path, mmap=zipped, what="Chinese-CLIP checkpoint")
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(f"{path}: not a Chinese-CLIP checkpoint (expected a state dict of tensors, or a dict "
                             "with one under 'state_dict')")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _layers(state: dict, prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


HEADS_HINT = ("give the head counts: `muge export --pretrained X.pt --attention-heads VISION,TEXT`, or for training "
              "model.attention_heads=[VISION, TEXT]")


def infer_architecture(state: dict, path: str, heads: dict | None = None) -> dict:
    """The published-style description of the checkpoint's model (module docstring). `heads`
    ({"vision": V, "text": T}): the attention heads, which the tensors cannot tell, for a model
    of a shape Chinese-CLIP does not publish."""
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in state):
        raise WeightsError(f"{path}: a ResNet (RN50) Chinese-CLIP: transformers has no ResNet Chinese-CLIP, so it "
                             "cannot be exported or fine-tuned here; use a ViT one (B/16, L/14, L/14@336px, H/14)")
    needed = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection", "logit_scale",
              "bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
              "bert.embeddings.token_type_embeddings.weight", "bert.encoder.layer.0.intermediate.dense.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise WeightsError(f"{path}: not a Chinese-CLIP ViT checkpoint: it lacks {first_of(missing, 4)}")
    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vocab, text_width = state["bert.embeddings.word_embeddings.weight"].shape
    arch = {
        "embed_dim": int(state["visual.proj"].shape[1]), "image_resolution": int(grid * patch),
        "vision_layers": _layers(state, "visual.transformer.resblocks."), "vision_width": int(width),
        "vision_patch_size": int(patch), "vision_heads": int(width // VISION_HEAD_WIDTH.get(int(width), 64)),
        "vocab_size": int(vocab), "text_hidden_size": int(text_width),
        "text_num_hidden_layers": _layers(state, "bert.encoder.layer."),
        "text_num_attention_heads": int(text_width // TEXT_HEAD_WIDTH),
        "text_intermediate_size": int(state["bert.encoder.layer.0.intermediate.dense.weight"].shape[0]),
        "text_max_position_embeddings": int(state["bert.embeddings.position_embeddings.weight"].shape[0]),
        "text_type_vocab_size": int(state["bert.embeddings.token_type_embeddings.weight"].shape[0]),
    }
    arch["published"] = PUBLISHED.get((arch["vision_width"], arch["vision_layers"], arch["vision_patch_size"],
                                       arch["image_resolution"]))
    heads = {k: v for k, v in (heads or {}).items() if v}
    arch["vision_heads"] = int(heads.get("vision", arch["vision_heads"]))
    arch["text_num_attention_heads"] = int(heads.get("text", arch["text_num_attention_heads"]))
    for tower, width, count in (("vision", arch["vision_width"], arch["vision_heads"]),
                                ("text", arch["text_hidden_size"], arch["text_num_attention_heads"])):
        if count < 1 or width % count:
            raise WeightsError(f"{path}: its {tower} tower is {width} wide, which {count} attention heads cannot "
                               f"split (a published Chinese-CLIP has 64-wide heads, 80 for ViT-H/14); {HEADS_HINT}")
    published_text = arch["text_hidden_size"] in (768, 1024) and arch["text_num_attention_heads"] == \
        arch["text_hidden_size"] // TEXT_HEAD_WIDTH
    if not heads and (arch["published"] is None or not published_text):
        log.warning("%s: not a shape Chinese-CLIP publishes (vision %d wide, %d layers; text %d wide): its attention "
                    "heads cannot be read from the tensors and are taken as %d (vision) and %d (text), 64 wide; if "
                    "it was trained with others, its embeddings will not be its own: %s", path, arch["vision_width"],
                    arch["vision_layers"], arch["text_hidden_size"], arch["vision_heads"],
                    arch["text_num_attention_heads"], HEADS_HINT)
    return arch


def hf_config(arch: dict):
    """`ChineseCLIPConfig` of the architecture (cn_clip's activations, norms and dropout)."""
    from transformers import ChineseCLIPConfig

    text = {"vocab_size": arch["vocab_size"], "hidden_size": arch["text_hidden_size"],
            "num_hidden_layers": arch["text_num_hidden_layers"],
            "num_attention_heads": arch["text_num_attention_heads"],
            "intermediate_size": arch["text_intermediate_size"],
            "max_position_embeddings": arch["text_max_position_embeddings"],
            "type_vocab_size": arch["text_type_vocab_size"], "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1, "layer_norm_eps": 1e-12}
    vision = {"hidden_size": arch["vision_width"], "intermediate_size": 4 * arch["vision_width"],
              "num_hidden_layers": arch["vision_layers"], "num_attention_heads": arch["vision_heads"],
              "image_size": arch["image_resolution"], "patch_size": arch["vision_patch_size"],
              "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": arch["embed_dim"]}
    return ChineseCLIPConfig(text_config=text, vision_config=vision, projection_dim=arch["embed_dim"])


_VISION_BLOCK = {"attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
                 "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
                 "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
                 "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
                 "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias"}
_VISION = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
           "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
           "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
           "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
           "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
           "visual.ln_post.weight": "vision_model.post_layernorm.weight",
           "visual.ln_post.bias": "vision_model.post_layernorm.bias", "logit_scale": "logit_scale"}


def to_hf_state_dict(state: dict, path: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """cn_clip's tensors under `ChineseCLIPModel`'s names: the packed attention projections split
    into q, k, v; `x @ proj` projections transposed into `Linear` weights; `bert.*` -> `text_model.*`.
    (Applied to a dict of gradients, it maps those too.) Refuses a tensor it has no place for."""
    out, unknown = {}, []
    for key, value in state.items():
        block = re.match(r"visual\.transformer\.resblocks\.(\d+)\.(.+)$", key)
        if key in _VISION:
            out[_VISION[key]] = value
        elif key in ("visual.proj", "text_projection"):
            out["visual_projection.weight" if key == "visual.proj" else "text_projection.weight"] = value.t()
        elif key.startswith("bert.") and not key.startswith("bert.pooler."):
            out["text_model." + key[len("bert."):]] = value
        elif key.startswith("bert.pooler."):
            continue  # BERT's pooler: no Chinese-CLIP encoder uses it
        elif block and block.group(2) in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if block.group(2).endswith("weight") else "bias"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"vision_model.encoder.layers.{block.group(1)}.self_attn.{name}.{kind}"] = part
        elif block and block.group(2) in _VISION_BLOCK:
            out[f"vision_model.encoder.layers.{block.group(1)}.{_VISION_BLOCK[block.group(2)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(f"{path}: {len(unknown)} tensors are not Chinese-CLIP's ({first_of(unknown, 4)}): another "
                             "model's checkpoint")
    return {k: v.contiguous() for k, v in out.items()}


_HF_VISION = {v: k for k, v in _VISION.items()}
_HF_BLOCK = {v: k for k, v in _VISION_BLOCK.items()}
PROJECTIONS = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}  # transposed


def cnclip_key(key: str) -> tuple[str, str | None]:
    """The cn_clip name of a `ChineseCLIPModel` tensor, and which of q, k, v it is where cn_clip
    packs the three into one projection (None elsewhere)."""
    layer = re.match(r"vision_model\.encoder\.layers\.(\d+)\.(.+)$", key)
    qkv = layer and re.fullmatch(r"self_attn\.(q|k|v)_proj\.(weight|bias)", layer.group(2))
    if key in _HF_VISION:
        return _HF_VISION[key], None
    if key in PROJECTIONS:
        return PROJECTIONS[key], None
    if key.startswith("text_model."):
        return "bert." + key[len("text_model."):], None
    if qkv:
        return f"visual.transformer.resblocks.{layer.group(1)}.attn.in_proj_{qkv.group(2)}", qkv.group(1)
    if layer and layer.group(2) in _HF_BLOCK:
        return f"visual.transformer.resblocks.{layer.group(1)}.{_HF_BLOCK[layer.group(2)]}", None
    raise WeightsError(f"{key}: a ChineseCLIPModel tensor with no place in Chinese-CLIP's checkpoint format")


def from_hf_state_dict(state: dict) -> dict[str, torch.Tensor]:
    """`to_hf_state_dict` undone: `ChineseCLIPModel`'s tensors under cn_clip's names (q, k, v packed
    into one projection again, `Linear` projections transposed back into `x @ proj` matrices,
    `text_model.*` -> `bert.*`): what cn_clip's `CLIP.load_state_dict` takes."""
    out, packed = {}, {}
    for key, value in state.items():
        name, part = cnclip_key(key)
        if part:
            packed.setdefault(name, {})[part] = value
        else:
            out[name] = value.t() if key in PROJECTIONS else value
    for name, parts in packed.items():
        out[name] = torch.cat([parts[n] for n in "qkv"])
    return {k: v.contiguous() for k, v in out.items()}


def cnclip_mismatch(config) -> str | None:
    """Where the model differs from every model cn_clip's `CLIP` can build (its vision MLP is 4x
    wide with QuickGELU, its norms' epsilons fixed), or None."""
    vision, text = config.vision_config, config.text_config
    fixed = (("vision_config.intermediate_size", vision.intermediate_size, 4 * vision.hidden_size),
             ("vision_config.hidden_act", vision.hidden_act, "quick_gelu"),
             ("vision_config.layer_norm_eps", vision.layer_norm_eps, 1e-5),
             ("text_config.layer_norm_eps", text.layer_norm_eps, 1e-12))
    wrong = [f"{key}={value!r} (cn_clip's: {theirs!r})" for key, value, theirs in fixed if value != theirs]
    return "; ".join(wrong) or None


TEXT_MODELS = {(768, 12): "RoBERTa-wwm-ext-base-chinese", (1024, 24): "RoBERTa-wwm-ext-large-chinese",
               (768, 3): "RBT3-chinese"}  # cn_clip/clip/model_configs, by (width, layers)


def published_names(state: dict) -> tuple[str | None, str | None]:
    """cn_clip's (vision, text) model names for a state dict in its layout, or None where the shape
    is not one it publishes (its `load_from_name` takes them to rebuild the model)."""
    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision = PUBLISHED.get((int(width), _layers(state, "visual.transformer.resblocks."), int(patch), int(grid * patch)))
    text_width = int(state["bert.embeddings.word_embeddings.weight"].shape[1])
    return vision, TEXT_MODELS.get((text_width, _layers(state, "bert.encoder.layer.")))


def load_cnclip(path: str, heads: dict | None = None):
    """(ChineseCLIPModel with the file's weights, the source record for the manifest, less the
    file's sha256: `ChineseCLIPEncoder.weights_source` adds it when asked). `heads`: see
    `infer_architecture`."""
    from transformers import ChineseCLIPModel

    state = read_checkpoint(path)
    arch = infer_architecture(state, path, heads)
    model = ChineseCLIPModel(hf_config(arch))
    missing = sorted({cnclip_key(key)[0] for key in model.state_dict()} - state.keys())
    if missing:  # named as the file names its tensors
        raise WeightsError(f"{path}: not a whole Chinese-CLIP checkpoint: it lacks {len(missing)} of the tensors its "
                           f"shape has ({first_of(missing, 4)})")
    try:
        load_weights(model, to_hf_state_dict(state, path), path, assign=True)
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from None
    source = {"pretrained": os.path.abspath(path), "format": CNCLIP_FORMAT, "architecture": arch}
    return model, source


def cn_clip_vocab(checkpoint: str) -> str:
    """The BERT vocabulary of the installed `cn_clip` package (every Chinese-CLIP model's), or a
    clear error naming the options that give one."""
    try:
        import cn_clip.clip
    except ImportError:
        raise WeightsError(f"{checkpoint}: a Chinese-CLIP checkpoint carries no tokenizer: give one with "
                             "--tokenizer DIR_OR_NAME (or model.text.tokenizer), e.g. "
                             "OFA-Sys/chinese-clip-vit-base-patch16, or install cn_clip (pip install --no-deps "
                             "cn-clip) for its vocabulary") from None
    return os.path.join(os.path.dirname(cn_clip.clip.__file__), "vocab.txt")
