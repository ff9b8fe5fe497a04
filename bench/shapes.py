"""Model shapes as plain dicts, for the benches (realistic sizes, random weights: speed does not
depend on weight values) and the tests (tiny sizes, seconds on a CPU). `setting` turns one into
a `--set` override."""
from __future__ import annotations

import json

BERT_CHINESE_VOCAB = 21128  # bert-base-chinese / chinese-roberta-wwm-ext, and Chinese-CLIP's text towers
BASE_LAYERS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
TINY_LAYERS = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}

BERT_BASE = {**BASE_LAYERS, "max_position_embeddings": 512}  # a BERT text tower: `model.text.config`
TINY_BERT = {**TINY_LAYERS, "max_position_embeddings": 64}
TINY_CLIP = {"projection_dim": 32, "text_config": TINY_BERT,
             "vision_config": {**TINY_LAYERS, "image_size": 32, "patch_size": 8}}

# `model.config` of a Chinese-CLIP preset (ChineseCLIPConfig fields), at the sizes Chinese-CLIP
# publishes (cn_clip/clip/model_configs): text RoBERTa-wwm-ext base (L/14 too) or large (H/14)
LARGE_LAYERS = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
ROBERTA_BASE = {**BASE_LAYERS, "max_position_embeddings": 512, "vocab_size": BERT_CHINESE_VOCAB}
ROBERTA_LARGE = {**LARGE_LAYERS, "max_position_embeddings": 512, "vocab_size": BERT_CHINESE_VOCAB}
VIT_B16_CLIP = {"projection_dim": 512, "text_config": ROBERTA_BASE,
                "vision_config": {**BASE_LAYERS, "image_size": 224, "patch_size": 16}}
VIT_L14_CLIP = {"projection_dim": 768, "text_config": ROBERTA_BASE,
                "vision_config": {**LARGE_LAYERS, "image_size": 224, "patch_size": 14}}
VIT_L14_336_CLIP = {**VIT_L14_CLIP, "vision_config": {**LARGE_LAYERS, "image_size": 336, "patch_size": 14}}
VIT_H14_CLIP = {"projection_dim": 1024, "text_config": ROBERTA_LARGE,
                "vision_config": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
                                  "intermediate_size": 5120, "image_size": 224, "patch_size": 14}}
CNCLIP_SHAPES = {"cnclip-vit-b16": VIT_B16_CLIP, "cnclip-vit-l14": VIT_L14_CLIP,
                 "cnclip-vit-l14-336": VIT_L14_336_CLIP, "cnclip-vit-h14": VIT_H14_CLIP}


def setting(key: str, value) -> str:
    """`key=value` for `load_config`'s overrides, the value written as JSON (which YAML reads)."""
    return f"{key}={json.dumps(value)}"
