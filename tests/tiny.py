"""Tiny model configs for tests: random weights, built from configs, seconds on a CPU."""
from bench.shapes import TINY_BERT, TINY_CLIP, setting
from train.config import load_config

COMMON = ["data.image_size=32", "data.max_text_length=24", "data.workers=0", "train.batch_size=32",
          "train.warmup_steps=2", "eval.batch_size=64", "train.seed=0", "data.augment.random_resized_crop=[0.7, 1.0]"]


def tiny_config(family: str = "dual", *overrides: str):
    if family == "dual":
        base = ["model.family=dual", "model.text.tokenizer=char-vocab", setting("model.text.config", TINY_BERT),
                "model.text.pooling=mean_max", "model.image.name=resnet10t", "model.embed_dim=32", "model.head=mlp",
                "train.lr={head: 2.0e-3, text: 1.0e-3, image: 2.0e-3}"]
    else:
        base = ["model.family=chinese-clip", "model.text.tokenizer=char-vocab", setting("model.config", TINY_CLIP),
                "train.lr={head: 1.0e-3, text: 1.0e-3, image: 1.0e-3}"]
    return load_config(None, base + COMMON + list(overrides))


CNCLIP_SHAPED = {**TINY_CLIP, "vision_config": {**TINY_CLIP["vision_config"], "intermediate_size": 128}}  # cn_clip's
# CLIP builds it: its vision MLP is 4x wide


def with_layers(shape: dict, layers: int) -> dict:
    """A Chinese-CLIP shape (`bench.shapes`) with `layers` layers in each tower (the same widths)."""
    return {**shape, "text_config": {**shape["text_config"], "num_hidden_layers": layers},
            "vision_config": {**shape["vision_config"], "num_hidden_layers": layers}}


def cn_clip_of(config):
    """cn_clip's own `CLIP` of a `ChineseCLIPConfig`'s shape, dropout off, in eval mode: what its
    `create_model` builds to load a checkpoint of that shape into."""
    from cn_clip.clip.model import CLIP

    vision, text = config.vision_config, config.text_config
    return CLIP(embed_dim=config.projection_dim, image_resolution=vision.image_size,
                vision_layers=vision.num_hidden_layers, vision_width=vision.hidden_size,
                vision_patch_size=vision.patch_size, vocab_size=text.vocab_size, text_attention_probs_dropout_prob=0.0,
                text_hidden_act=text.hidden_act, text_hidden_dropout_prob=0.0, text_hidden_size=text.hidden_size,
                text_initializer_range=0.02, text_intermediate_size=text.intermediate_size,
                text_max_position_embeddings=text.max_position_embeddings,
                text_num_attention_heads=text.num_attention_heads, text_num_hidden_layers=text.num_hidden_layers,
                text_type_vocab_size=text.type_vocab_size,
                vision_head_width=vision.hidden_size // vision.num_attention_heads).eval()


def rerank_topk(method: str, queries, gallery, stats, beta: float, k: int = 10):
    """(scores, gallery positions) of the re-ranked exact top-k, as predict ranks with --rerank."""
    from competition.topk import exact_topk
    from predict.rerank import rescorer

    return exact_topk(queries, gallery, k=k, rescore=rescorer(method, queries, gallery, stats, beta))
