"""The project's own augmentations (`train.transform`, when `data.augment.auto_augment` is off),
each against its definition: the same random draws replayed by hand give the same pixels or text."""
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from competition.preprocess import resize_image
from train.config import Augment
from train.transform import augment_image, augment_text

IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
SIZE = 32


def _augment(seed=0, **settings):
    aug = Augment(**{"random_resized_crop": [], "hflip": 0.0, **settings})
    return augment_image(IMAGE, aug, SIZE, "squash", np.random.default_rng(seed))


def _resized(img):
    return resize_image(img, SIZE, "squash")


def test_with_every_augmentation_off_the_image_is_only_resized():
    assert np.array_equal(_augment(), _resized(IMAGE))


def test_grayscale_turns_the_image_grey():
    out = _augment(grayscale=1.0)
    assert np.array_equal(out, _resized(IMAGE.convert("L").convert("RGB")))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert not (_augment(grayscale=0.0)[..., 0] == _augment(grayscale=0.0)[..., 1]).all()


def test_blur_is_a_gaussian_of_the_drawn_radius():
    rng = np.random.default_rng(5)
    assert rng.random() < 1.0
    radius = float(rng.uniform(0.1, 1.5))
    assert np.array_equal(_augment(5, blur=1.0), _resized(IMAGE.filter(ImageFilter.GaussianBlur(radius))))


def test_colour_jitter_scales_brightness_contrast_and_saturation_within_its_strength():
    rng, img = np.random.default_rng(7), IMAGE
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        factor = float(rng.uniform(0.6, 1.4))
        assert 0.6 <= factor <= 1.4
        img = enhance(img).enhance(factor)
    assert np.array_equal(_augment(7, color_jitter=0.4), _resized(img))


def test_hflip_mirrors_the_resized_image():
    assert np.array_equal(_augment(hflip=1.0), _resized(IMAGE)[:, ::-1])


@pytest.mark.parametrize("seed", range(5))
def test_the_random_resized_crop_keeps_its_scale_range(seed):
    """The crop's area is drawn in [lo, hi] of the image's, at an aspect ratio in [3/4, 4/3]."""
    rng = np.random.default_rng(seed)
    w, h = IMAGE.size
    area = w * h * rng.uniform(0.5, 0.9)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = min(w, int(round(np.sqrt(area * ratio)))), min(h, int(round(np.sqrt(area / ratio))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    expected = _resized(IMAGE.crop((x, y, x + cw, y + ch)))
    assert np.array_equal(_augment(seed, random_resized_crop=[0.5, 0.9]), expected)


def _text(text, seed=0, **settings):
    return augment_text(text, Augment(**settings), np.random.default_rng(seed))


def test_word_dropout_drops_words_or_without_spaces_characters():
    """A spaced query loses whole words; a Chinese query without spaces loses characters, each
    with the set probability, in order; one unit is always kept."""
    assert _text("红色 连衣裙 夏季", word_dropout=1.0) in ("红色", "连衣裙", "夏季")
    assert len(_text("红色连衣裙", word_dropout=1.0)) == 1
    rng, text = np.random.default_rng(3), "高级感托特包斜挎"
    kept = "".join(c for c in text if rng.random() >= 0.5)
    assert 0 < len(kept) < len(text) and _text(text, 3, word_dropout=0.5) == kept
    rng = np.random.default_rng(3)
    words = [w for w in ["高级感", "托特包", "斜挎", "女"] if rng.random() >= 0.5]
    assert _text("高级感 托特包 斜挎 女", 3, word_dropout=0.5) == " ".join(words)
    assert _text("红色连衣裙", word_dropout=0.0) == "红色连衣裙"


def test_random_swap_swaps_two_neighbours():
    assert _text("红裙", random_swap=1.0) == "裙红"
    assert _text("红色 连衣裙", random_swap=1.0) == "连衣裙 红色"
    rng = np.random.default_rng(4)
    assert rng.random() < 1.0
    i = int(rng.integers(3))
    units = list("连衣裙夏")
    units[i], units[i + 1] = units[i + 1], units[i]
    assert _text("连衣裙夏", 4, random_swap=1.0) == "".join(units)
    assert _text("连衣裙", random_swap=0.0) == "连衣裙"
