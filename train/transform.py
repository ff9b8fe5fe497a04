"""Train-time augmentations. Evaluation uses `competition.preprocess.resize_image` unchanged,
the same function `predict` uses. Every random draw comes from the sample's own generator, so a
sample's augmentation depends only on (seed, epoch, index): deterministic with any worker count
and across resume.

Two paths: our own (random resized crop, colour jitter, blur, grayscale, flip), or, with
`data.augment.auto_augment`, timm's training transform as Chinese-CLIP builds it for
`--use-augment` (cn_clip/training/data.py `_build_transform`: `create_transform(input_size,
scale=(0.9, 1.0), is_training=True, color_jitter=None, auto_augment='original',
interpolation='bicubic', ...)`): timm's crop, flip and AutoAugment run as they are, seeded from
the sample's generator, and stop at uint8 pixels (the normalisation is the model's first layer).
"""
from __future__ import annotations

import functools
import random
import re

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from competition.preprocess import resize_image

from .config import Augment


@functools.lru_cache(maxsize=4)
def timm_train_transform(size: int, scale: tuple[float, float], hflip: float, policy: str):
    """timm's training transform up to (not including) its tensor conversion and normalisation."""
    from timm.data import create_transform
    from torchvision.transforms import Compose

    from model.layers import CLIP_MEAN, CLIP_STD  # AutoAugment fills rotated and shifted corners with the mean

    full = create_transform(input_size=size, scale=scale, hflip=hflip, is_training=True, color_jitter=None,
                            auto_augment=policy, interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD)
    return Compose(full.transforms[:-2])  # [..., MaybeToTensor, Normalize]


def seeded_timm_augment(img: Image.Image, transform, seed: int) -> np.ndarray:
    """`transform(img)` with Python's and torch's RNGs seeded to `seed` for the call alone (timm
    draws from both), restored afterwards: the trainer's own RNG streams are untouched."""
    saved = random.getstate()
    random.seed(seed)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = transform(img)
    finally:
        random.setstate(saved)
    return np.asarray(out.convert("RGB"), dtype=np.uint8)


def augment_image(img: Image.Image, aug: Augment, size: int, rule: str, rng: np.random.Generator) -> np.ndarray:
    if aug.auto_augment:
        transform = timm_train_transform(size, tuple(aug.random_resized_crop), aug.hflip, aug.auto_augment)
        return seeded_timm_augment(img, transform, int(rng.integers(2**63)))
    if aug.random_resized_crop:
        lo, hi = aug.random_resized_crop
        w, h = img.size
        area = w * h * rng.uniform(lo, hi)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = min(w, int(round(np.sqrt(area * ratio)))), min(h, int(round(np.sqrt(area / ratio))))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.crop((x, y, x + cw, y + ch))
        rule = "squash"
    if aug.color_jitter > 0:
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhance(img).enhance(float(rng.uniform(1 - aug.color_jitter, 1 + aug.color_jitter)))
    if aug.blur > 0 and rng.random() < aug.blur:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.1, 1.5))))
    if aug.grayscale > 0 and rng.random() < aug.grayscale:
        img = img.convert("L").convert("RGB")
    arr = resize_image(img, size, rule)
    if aug.hflip > 0 and rng.random() < aug.hflip:  # PIL flips x2.3 faster than a numpy copy of arr[:, ::-1]
        arr = np.asarray(Image.fromarray(arr).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    return arr


_WORDS = re.compile(r"\s+")


def augment_text(text: str, aug: Augment, rng: np.random.Generator) -> str:
    """Word dropout and one random swap. Chinese queries rarely have spaces, so without spaces the
    units are characters."""
    if aug.word_dropout <= 0 and aug.random_swap <= 0:
        return text
    spaced = " " in text.strip()
    units = _WORDS.split(text.strip()) if spaced else list(text)
    if len(units) > 1 and aug.word_dropout > 0:
        keep = [u for u in units if rng.random() >= aug.word_dropout]
        units = keep or [units[int(rng.integers(len(units)))]]
    if len(units) > 1 and rng.random() < aug.random_swap:
        i = int(rng.integers(len(units) - 1))
        units[i], units[i + 1] = units[i + 1], units[i]
    return (" " if spaced else "").join(units)
