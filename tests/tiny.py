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


def rerank_topk(method: str, queries, gallery, stats, beta: float, k: int = 10):
    """(scores, gallery positions) of the re-ranked exact top-k, as predict ranks with --rerank."""
    from competition.topk import exact_topk
    from predict.rerank import rescorer

    return exact_topk(queries, gallery, k=k, rescore=rescorer(method, queries, gallery, stats, beta))
