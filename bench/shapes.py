"""Model shapes as plain dicts, for the benches (realistic sizes, random weights: speed does not
depend on weight values) and the tests (tiny sizes, seconds on a CPU). `setting` turns one into
a `--set` override."""
from __future__ import annotations

import json

BERT_CHINESE_VOCAB = 21128  # bert-base-chinese / chinese-roberta-wwm-ext, and Chinese-CLIP's text towers
BASE_LAYERS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
TINY_LAYERS = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}

BERT_BASE = {**BASE_LAYERS, "max_position_embeddings": 512}  # a dual text tower: `model.text.config`
TINY_BERT = {**TINY_LAYERS, "max_position_embeddings": 64}

# `model.config` of the chinese-clip family (ChineseCLIPConfig fields)
VIT_B16_CLIP = {"projection_dim": 512,
                "text_config": {**BASE_LAYERS, "max_position_embeddings": 512, "vocab_size": BERT_CHINESE_VOCAB},
                "vision_config": {**BASE_LAYERS, "image_size": 224, "patch_size": 16}}
TINY_CLIP = {"projection_dim": 32, "text_config": {**TINY_LAYERS, "max_position_embeddings": 64},
             "vision_config": {**TINY_LAYERS, "image_size": 32, "patch_size": 8}}


def setting(key: str, value) -> str:
    """`key=value` for `load_config`'s overrides, the value written as JSON (which YAML reads)."""
    return f"{key}={json.dumps(value)}"
