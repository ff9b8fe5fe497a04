"""Tiny model configs for tests: random weights, built from configs, seconds on a CPU."""
from train.params import load_config

TINY_BERT = ("model.text.config={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
             "intermediate_size: 64, max_position_embeddings: 64}")
TINY_CLIP = ("model.config={projection_dim: 32, text_config: {hidden_size: 32, num_hidden_layers: 2, "
             "num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 64}, "
             "vision_config: {hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, "
             "image_size: 32, patch_size: 8}}")
COMMON = ["data.image_size=32", "data.max_text_length=24", "data.workers=0", "train.batch_size=32",
          "train.warmup_steps=2", "eval.batch_size=64", "train.seed=0", "data.augment.random_resized_crop=[0.7, 1.0]"]


def tiny_config(family: str = "dual", *overrides: str):
    if family == "dual":
        base = ["model.family=dual", "model.text.tokenizer=char-vocab", TINY_BERT, "model.text.pooling=mean_max",
                "model.image.name=resnet10t", "model.embed_dim=32", "model.head=mlp",
                "train.lr={head: 2.0e-3, text: 1.0e-3, image: 2.0e-3}"]
    else:
        base = ["model.family=chinese-clip", "model.text.tokenizer=char-vocab", TINY_CLIP,
                "train.lr={head: 1.0e-3, text: 1.0e-3, image: 1.0e-3}"]
    return load_config(None, base + COMMON + list(overrides))
