"""MUGE image galleries: `img_id<TAB>base64(JPEG)` TSV files, read without loading them.

One streaming pass builds a byte-offset index (ids, offsets, lengths) that is cached beside the
TSV (or in a cache dir when that is read-only) and rebuilt when the TSV's size, mtime or a
sample of its content changes (`infra.io.content_fingerprint`).
Any image is then read by id with one `pread`. `iter_tsv` streams a file in order.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

try:
    import simplejpeg
except ImportError:  # every image then goes through PIL alone
    simplejpeg = None

from infra.io import atomic_path, content_fingerprint

from .errors import MugeDataError, first_of, fits_int64
from .preprocess import resize_image

log = logging.getLogger(__name__)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG is an error, not a grey half-image
INDEX_VERSION = 2
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")


@dataclass(frozen=True)
class TsvRecord:
    line: int          # 1-based line number
    img_id: int
    offset: int        # byte offset of the base64 payload
    payload: bytes     # base64 text


def _parse_line(raw: bytes, path: str, lineno: int, offset: int) -> TsvRecord:
    line = raw.rstrip(b"\r\n")
    if not line.strip():
        raise MugeDataError(path, "blank line (expected img_id<TAB>base64)", lineno)
    tab = line.find(b"\t")
    if tab < 0:
        raise MugeDataError(path, "no tab: expected img_id<TAB>base64", lineno)
    head = line[:tab].strip()
    if not head.isdigit():  # ASCII digits only: int() would also take "1_2_3", "+5" or " ٣"
        raise MugeDataError(path, f"image id {head[:40]!r} is not a decimal integer", lineno)
    img_id = int(head)
    if not fits_int64(img_id):
        raise MugeDataError(path, f"image id {head[:40].decode()} does not fit in a signed 64-bit integer", lineno)
    return TsvRecord(lineno, img_id, offset + tab + 1, line[tab + 1:])


def iter_tsv(path, check_duplicates: bool = True) -> Iterator[TsvRecord]:
    """Stream the records of a gallery TSV in file order, one line in memory at a time."""
    path = os.fspath(path)
    seen: dict[int, int] = {}
    offset = 0
    lineno = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM
                raw = raw[3:]
                offset = 3
            rec = _parse_line(raw, path, lineno, offset)
            if check_duplicates:
                first = seen.setdefault(rec.img_id, lineno)
                if first != lineno:
                    raise MugeDataError(path, f"duplicate image id {rec.img_id} (first on line {first})", lineno)
            offset += len(raw)
            yield rec
    if lineno == 0:
        raise MugeDataError(path, "empty file: no images")


def decode_base64(payload: bytes, path, line: int, img_id: int) -> bytes:
    """Accept both urlsafe (the organisers' snippet) and standard base64, padded or not."""
    data = payload.strip().translate(_URLSAFE_TO_STD)
    data += b"=" * (-len(data) % 4)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MugeDataError(path, f"image {img_id}: invalid base64 ({exc})", line) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img).astype(np.float32)
        if mode != "F" and arr.max(initial=0) > 255:  # 16-bit data
            arr = arr / 257.0
        return Image.fromarray(arr.clip(0, 255).round().astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info) \
        or (mode in ("L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _has_exif(data: bytes) -> bool:
    """Whether a JPEG's header segments (before the scan) hold an EXIF block (which may rotate it)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:  # start of scan: no more header segments
            return False
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\x00\x00":
            return True
        pos += 2 + length
    return True  # a header we cannot walk: let PIL decide


def _plain_jpeg_shape(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG that libjpeg-turbo through simplejpeg decodes to exactly PIL's
    pixels (both run its accurate DCT and fancy upsampling; a test compares every sample image);
    None wherever PIL must decide: not a JPEG, not YCbCr or grey, EXIF present, too many pixels."""
    if simplejpeg is None or not data.startswith(b"\xff\xd8") or _has_exif(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray") or height * width > (Image.MAX_IMAGE_PIXELS or 2**62):
        return None
    return height, width


def _simplejpeg_rgb(data: bytes, out: np.ndarray | None = None) -> np.ndarray | None:
    """libjpeg-turbo's RGB uint8 array of a JPEG `_plain_jpeg_shape` accepted (written into `out`
    when given), or None where the decoder complains."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, buffer=out)
    except ValueError:
        return None


def _decode_plain_jpeg(data: bytes) -> np.ndarray | None:
    """The fast path: an RGB uint8 array without PIL. None where `_plain_jpeg_shape` says PIL
    decides, or the decoder complains."""
    return None if _plain_jpeg_shape(data) is None else _simplejpeg_rgb(data)


def decode_image(data: bytes, path=None, line: int | None = None, img_id: int | None = None,
                 draft: int | None = None) -> Image.Image:
    """Bytes of an image file -> an RGB PIL image, upright per EXIF. Errors name the image.
    `draft`: a JPEG may be decoded at a reduced scale no smaller than draft x draft (thumbnails).
    Plain JPEGs decode through libjpeg-turbo (`_decode_plain_jpeg`): x1.12-1.15 PIL's own on the
    sample's 224 px images, most of simplejpeg's x1.8 being spent on the PIL image made here;
    `decode_pixels` skips that image where no resize is needed."""
    if not draft and (arr := _decode_plain_jpeg(data)) is not None:
        return Image.fromarray(arr, "RGB")
    return decode_image_pil(data, path, line, img_id, draft)


def decode_pixels(data: bytes, size: int, rule: str, out: np.ndarray | None = None, path=None,
                  line: int | None = None, img_id: int | None = None) -> np.ndarray:
    """Bytes of an image file -> uint8 [size, size, 3], the pixels `resize_image(decode_image(...))`
    gives, written into `out` when given. A plain JPEG already size x size (MUGE's images are
    224 x 224) decodes straight into the array: no PIL image, no copy."""
    shape = _plain_jpeg_shape(data)  # the header, parsed once for both paths
    fits = shape == (size, size)
    arr = _simplejpeg_rgb(data, out if fits else None) if shape is not None else None
    if arr is not None and fits:
        return arr
    image = Image.fromarray(arr, "RGB") if arr is not None else decode_image_pil(data, path, line, img_id)
    pixels = resize_image(image, size, rule)
    if out is None:
        return pixels
    out[...] = pixels
    return out


def decode_image_pil(data: bytes, path=None, line: int | None = None, img_id: int | None = None,
                     draft: int | None = None) -> Image.Image:
    """`decode_image` through PIL alone: every format, EXIF rotation, and the error messages."""
    what = f"image {img_id}" if img_id is not None else "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's warnings become errors below or are harmless
            img = Image.open(io.BytesIO(data))
            if draft:
                img.draft("RGB", (draft, draft))
            img.load()
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # a broken EXIF block should not lose an otherwise good image
                pass
            return _to_rgb(img)
    except UnidentifiedImageError:
        raise MugeDataError(path, f"{what}: bytes are not an image file", line) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise MugeDataError(path, f"{what}: truncated or corrupt image ({exc})", line) from None


def default_cache_dir() -> str:
    return os.environ.get("MUGE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "muge-retrieval"))


@dataclass
class ImageTSV:
    """Random access to a gallery TSV by image id through a cached byte-offset index."""

    path: str
    cache_dir: str | None = None
    ids: np.ndarray = field(init=False, repr=False)
    offsets: np.ndarray = field(init=False, repr=False)
    lengths: np.ndarray = field(init=False, repr=False)
    index_path: str = field(init=False)

    def __post_init__(self):
        self.path = os.fspath(self.path)
        if not os.path.isfile(self.path):
            raise MugeDataError(self.path, "image TSV not found")
        self._fd = None
        self._pid = None
        self._load_or_build_index()
        # ids sorted, for binary search by id (built here, so forked workers share them)
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted_ids = self.ids[self._order]

    # -- index --------------------------------------------------------------------------------
    def _index_candidates(self) -> list[str]:
        beside = self.path + ".idx.npz"
        key = hashlib.sha1(os.path.abspath(self.path).encode()).hexdigest()[:16]
        cached = os.path.join(self.cache_dir or default_cache_dir(), "index", f"{key}.idx.npz")
        return [beside, cached]

    def _load_or_build_index(self) -> None:
        st = os.stat(self.path)
        size, mtime, content = st.st_size, st.st_mtime_ns, content_fingerprint(self.path)
        for candidate in self._index_candidates():
            try:
                with np.load(candidate) as z:
                    if (int(z["version"]) == INDEX_VERSION and int(z["size"]) == size and int(z["mtime_ns"]) == mtime
                            and str(z["content"]) == content):
                        self.ids, self.offsets, self.lengths = z["ids"], z["offsets"], z["lengths"]
                        self.index_path = candidate
                        return
            except Exception as exc:  # absent, truncated or foreign: the index is only a cache, rebuild it
                if os.path.exists(candidate):
                    log.warning("ignoring unreadable index %s (%s); rebuilding it", candidate, type(exc).__name__)
                continue
        self._build_index(size, mtime, content)

    def _build_index(self, size: int, mtime: int, content: str) -> None:
        from tqdm import tqdm

        ids, offsets, lengths = [], [], []
        with tqdm(total=size, unit="B", unit_scale=True, desc=f"indexing {os.path.basename(self.path)}",
                  disable=size < (64 << 20), leave=False) as bar:
            last = 0
            for rec in iter_tsv(self.path):
                ids.append(rec.img_id)
                offsets.append(rec.offset)
                lengths.append(len(rec.payload))
                bar.update(rec.offset - last)
                last = rec.offset
        self.ids = np.asarray(ids, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        arrays = dict(ids=self.ids, offsets=self.offsets, lengths=self.lengths, size=size, mtime_ns=mtime,
                      content=np.array(content), version=INDEX_VERSION)
        for candidate in self._index_candidates():
            try:
                with atomic_path(candidate, suffix=".npz") as tmp:
                    with open(tmp, "wb") as f:
                        np.savez(f, **arrays)
                self.index_path = candidate
                return
            except OSError as exc:  # read-only data directory: fall back to the cache dir
                log.debug("cannot write index %s: %s", candidate, exc)
        self.index_path = ""
        log.warning("could not cache the index of %s anywhere; it will be rebuilt next time", self.path)

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, img_id: int) -> bool:
        return self.position(img_id) >= 0

    def position(self, img_id: int) -> int:
        """0-based row of `img_id` in the file, or -1. A binary search over numpy arrays rather
        than a dict of Python ints: forked DataLoader workers then share the index pages
        instead of copying them as reference counts change (129k images: 2 MB, not ~15 MB)."""
        img_id = int(img_id)
        if not fits_int64(img_id):
            return -1
        k = int(np.searchsorted(self._sorted_ids, img_id))
        return int(self._order[k]) if k < len(self._sorted_ids) and self._sorted_ids[k] == img_id else -1

    def contains_all(self, img_ids: np.ndarray) -> np.ndarray:
        """Vectorised membership: a bool per id."""
        return np.isin(np.asarray(img_ids, dtype=np.int64), self.ids)

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # one descriptor per (forked) process
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def line_of(self, img_id: int) -> int:
        return self.position(img_id) + 1

    def read_payload(self, img_id: int) -> bytes:
        pos = self.position(img_id)
        if pos < 0:
            raise MugeDataError(self.path, f"image {img_id} is not in this gallery")
        return os.pread(self._file(), int(self.lengths[pos]), int(self.offsets[pos]))

    def read_bytes(self, img_id: int) -> bytes:
        return decode_base64(self.read_payload(img_id), self.path, self.line_of(img_id), img_id)

    def load(self, img_id: int, draft: int | None = None) -> Image.Image:
        """The RGB image of `img_id`; errors name the TSV, line and id."""
        return decode_image(self.read_bytes(img_id), self.path, self.line_of(img_id), img_id, draft)

    def load_pixels(self, img_id: int, size: int, rule: str, out: np.ndarray | None = None) -> np.ndarray:
        """`img_id` resized to uint8 [size, size, 3] (`decode_pixels`), into `out` when given."""
        return decode_pixels(self.read_bytes(img_id), size, rule, out, self.path, self.line_of(img_id), img_id)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self):  # picklable for DataLoader workers: the descriptor is reopened there
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_pid"] = None
        return state


@dataclass
class SkippedImages:
    """Undecodable images left out under `--skip-bad-images`: how many, and which."""

    items: list[tuple[int, int, str]] = field(default_factory=list)  # (img_id, line, reason)

    def summary(self) -> str:
        if not self.items:
            return "no images skipped"
        return f"skipped {len(self.items)} undecodable image(s): {first_of(i for i, _, _ in self.items)}"
