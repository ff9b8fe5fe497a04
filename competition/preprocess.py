"""The preprocessing that must be identical at training-time evaluation and at prediction.

Images: decode (see `images.decode_image`) then `resize_image` to uint8 HWC on the host; the
cast, scaling and mean/std live inside the model (and so inside the exported ONNX graph).
Text: the run's normalization (`TEXT_NORMALIZATIONS`, recorded in the run's config and the
bundle's manifest) then the run's own `tokenizer.json`, loaded by `TextTokenizer`.
Both `train` and `predict` import these; neither has its own copy.
"""
from __future__ import annotations

import os
import re
import unicodedata

import numpy as np
from PIL import Image

from .errors import MugeDataError

RESIZE_RULES = ("squash", "shorter-crop")
TEXT_NORMALIZATION = "nfkc+collapse-whitespace"  # the default
_SPACES = re.compile(r"\s+")
_SURROGATES = re.compile("[\ud800-\udfff]")


def resize_image(img: Image.Image, size: int, rule: str = "squash") -> np.ndarray:
    """RGB PIL image -> uint8 array [size, size, 3].

    squash:       resize straight to size x size (bicubic), as Chinese-CLIP does; MUGE images are
                  already 224x224 squares, so nothing is cropped away.
    shorter-crop: resize the shorter side to `size`, then centre-crop (timm's eval transform).
    """
    if rule == "squash":
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
    elif rule == "shorter-crop":
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:
        raise ValueError(f"unknown resize rule {rule!r}; expected one of {RESIZE_RULES}")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got array of shape {arr.shape}")
    return arr


def normalize_text(text: str) -> str:
    """Full-width to half-width (NFKC), whitespace collapsed, ends stripped; a lone surrogate
    (valid JSON, "\\ud800", but no character) becomes U+FFFD. Lower-casing and CJK splitting are
    the tokenizer's job."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", _SURROGATES.sub("\ufffd", text))).strip()


def cn_clip_text(text: str) -> str:
    """Chinese-CLIP's own `_preprocess_text` (cn_clip/training/data.py, cn_clip/eval/data.py):
    lower-case, curly double quotes made straight; nothing else before its BERT tokenizer. A lone
    surrogate becomes U+FFFD, which that tokenizer drops."""
    return _SURROGATES.sub("\ufffd", text).lower().replace("\u201c", '"').replace("\u201d", '"')


# name (as configs and manifests record it) -> the function applied before the tokenizer
TEXT_NORMALIZATIONS = {TEXT_NORMALIZATION: normalize_text, "cn-clip": cn_clip_text}


class TextTokenizer:
    """A run's `tokenizer.json` (Hugging Face `tokenizers` format), padded to the batch's longest."""

    FILE = "tokenizer.json"

    def __init__(self, path, max_length: int, normalization: str = TEXT_NORMALIZATION):
        from tokenizers import Tokenizer

        if normalization not in TEXT_NORMALIZATIONS:
            raise ValueError(f"unknown text normalization {normalization!r}; expected one of "
                             f"{', '.join(TEXT_NORMALIZATIONS)}")
        self.normalization, self.normalize = normalization, TEXT_NORMALIZATIONS[normalization]
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, self.FILE)
        self.path = path
        self.max_length = int(max_length)
        self.tok = Tokenizer.from_file(path)
        self.pad_id = self._special("[PAD]", "<pad>") or 0
        self.unk_id = self._special("[UNK]", "<unk>")
        self.tok.enable_truncation(self.max_length)
        self.tok.no_padding()

    def _special(self, *tokens: str) -> int | None:
        return next((i for i in map(self.tok.token_to_id, tokens) if i is not None), None)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def max_id(self) -> int:
        """The largest id the tokenizer can emit (its vocabulary and added tokens)."""
        return max(self.tok.get_vocab(with_added_tokens=True).values())

    def unknown_share(self, texts) -> float:
        """The share of the texts' tokens (specials aside) that the vocabulary does not know."""
        specials = {i for i in map(self.tok.token_to_id, ("[CLS]", "[SEP]", "<s>", "</s>", "[PAD]", "<pad>"))
                    if i is not None}
        ids = [i for e in self.tok.encode_batch([self.normalize(t) for t in texts]) for i in e.ids if i not in specials]
        return sum(i == self.unk_id for i in ids) / len(ids) if ids and self.unk_id is not None else 0.0

    def __call__(self, texts, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (input_ids, attention_mask), int64 [batch, longest <= max_length], or
        [batch, pad_to] for a fixed shape (a compiled training step)."""
        encs = self.tok.encode_batch([self.normalize(t) for t in texts])
        length = max(1, pad_to or 0, max(len(e.ids) for e in encs))
        ids = np.full((len(encs), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encs), length), dtype=np.int64)
        for row, e in enumerate(encs):
            ids[row, :len(e.ids)] = e.ids
            mask[row, :len(e.ids)] = 1
        return ids, mask


TOKENIZER_DIR = "tokenizer"  # in a run directory and in a bundle: the run's tokenizer.json (and its vocabulary)


def directory_tokenizer(directory: str, max_length: int, normalization: str = TEXT_NORMALIZATION) -> TextTokenizer:
    """The tokenizer a run or a bundle directory holds (`tokenizer/`), with the length and the
    normalisation it was trained with. An unreadable one is a `MugeDataError` naming it."""
    path = os.path.join(directory, TOKENIZER_DIR)
    try:
        return TextTokenizer(path, max_length, normalization)
    except ValueError:
        raise
    except Exception as exc:  # the tokenizers library raises its own exception type
        raise MugeDataError(path, f"no readable {TextTokenizer.FILE} ({str(exc).splitlines()[0][:200]})") from None
