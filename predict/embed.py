"""Gallery and query embeddings with ONNX Runtime, cached on disk.

Gallery images are decoded and resized by worker processes straight into a ring of
shared-memory batch slots (`infra.gallery`) while the main process runs the image graph on
each slot as it is: no pixel crosses a pipe, and at most `2 x workers` batches are in flight, so
memory stays bounded whatever the gallery size. Embeddings are saved per chunk of TSV lines
under a key made of the bundle's hash and the input file's fingerprint; a rerun reuses them and a
run killed mid-gallery resumes from its last completed chunk. Processes that share a cache
directory (a team on one box, `make -j`) take turns on a gallery through a lock file: the second
waits, then reuses what the first wrote.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from competition import ImageTSV, SkippedImages, read_queries
from infra.gallery import DecodeRing
from infra.io import WriteError, atomic_path, content_fingerprint, probe_directory

from .runtime import BundleEncoders

log = logging.getLogger(__name__)


def file_fingerprint(path: str) -> str:
    """The file's path, size, mtime and a sample of its content (`content_fingerprint`): a TSV
    rewritten, or edited in place within a sampled span, gets new embeddings, not the old ones."""
    return hashlib.sha256(f"{os.path.abspath(path)}|{content_fingerprint(path)}".encode()).hexdigest()[:16]


@dataclass
class GalleryEmbeddings:
    ids: np.ndarray
    features: np.ndarray
    skipped: SkippedImages = field(default_factory=SkippedImages)
    from_cache: bool = False


TTA = ("hflip",)


def _cache_dir(cache_root: str, encoders: BundleEncoders, input_path: str, kind: str, *settings) -> str:
    """Keyed by the graphs really loaded (verified against the manifest), the preprocessing, and
    every setting that changes the result (`--skip-bad-images` and `--tta` for the gallery)."""
    text = [encoders.tokenizer.max_length] + ([encoders.tokenizer.normalization] if kind != "gallery" else [])
    key = hashlib.sha256(json.dumps([encoders.graph_hashes, encoders.image_size, encoders.resize_rule, *text,
                                     *settings]).encode()).hexdigest()[:16]
    return os.path.join(cache_root, key, f"{kind}-{file_fingerprint(input_path)}")


@contextlib.contextmanager
def cache_lock(directory: str):
    """Hold an exclusive lock on `directory`'s `.lock` file (released when the process exits, even
    on SIGKILL): one process at a time writes and removes a cache entry's chunk files."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(os.path.join(directory, ".lock"), os.O_CREAT | os.O_RDWR, 0o666)
    except OSError as exc:
        raise WriteError(exc.errno, f"cannot write the embeddings cache {directory}: {exc.strerror or exc}; give "
                                    "--cache-dir a writable directory") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is embedding into %s: waiting for it, then reusing its work", directory)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)  # a cache that cannot be written, as opposed to a full disk
_warned: set[str] = set()


def cache_writable(directory: str) -> bool:
    """Whether cache entries can be written in `directory` (made when missing). A read-only or
    another user's cache directory is warned about once and used for reading alone: predict embeds
    what it lacks without saving it. Any other failure (a full disk) is a WriteError naming it."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe_directory(directory, ".write-check-")
        return True
    except OSError as exc:
        if exc.errno not in READ_ONLY:
            raise WriteError(exc.errno, f"cannot write the embeddings cache {directory}: {exc.strerror or exc}; "
                                        "give --cache-dir a writable directory") from None
        root = directory.split(os.sep + "gallery-")[0].split(os.sep + "queries-")[0]
        if root not in _warned:
            _warned.add(root)
            log.warning("the embeddings cache %s cannot be written (%s): embedding without saving what is not "
                        "cached already (give --cache-dir a writable directory to keep it)", directory,
                        exc.strerror or exc)
        return False


def load_npz(path: str, *keys: str) -> dict | None:
    """The arrays of a cache file, or None when it is absent or unreadable (a run killed while
    the disk filled, say): a cache is recomputed, never trusted half-written."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys}
    except Exception as exc:
        log.warning("ignoring unreadable cache file %s (%s); recomputing it", path, type(exc).__name__)
        return None

def save_npz(path: str, **arrays) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def encode_gallery_images(encoders: BundleEncoders, pixels: np.ndarray, tta: str | None = None) -> np.ndarray:
    """Image embeddings; with `tta="hflip"` the L2-normalised mean of each image's and its mirror's."""
    feats = encoders.encode_images(pixels)
    if tta is None:
        return feats
    if tta not in TTA:
        raise ValueError(f"unknown test-time augmentation {tta!r}; expected one of {', '.join(TTA)}")
    feats = feats + encoders.encode_images(pixels[:, :, ::-1])
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


def embed_gallery(encoders: BundleEncoders, tsv_path: str, cache_root: str, *, workers: int = 2,
                  chunk_size: int = 4096, skip_bad: bool = False, tta: str | None = None) -> GalleryEmbeddings:
    """Embed every image of `tsv_path` (file order), reusing and extending the on-disk cache.
    Decode tasks are `encoders.batch_size` lines each, so the image graph sees one batch shape.
    `tta`: see `encode_gallery_images`; cached apart from the plain embeddings."""
    cache = _cache_dir(cache_root, encoders, tsv_path, "gallery", skip_bad, *([tta] if tta else []))
    cached = _cached_gallery(cache)  # a finished entry is read without the lock: it was written whole (renamed)
    if cached is not None:
        return cached
    if not cache_writable(cache):
        return _embed_gallery(encoders, tsv_path, None, workers=workers, chunk_size=chunk_size, skip_bad=skip_bad,
                              tta=tta)
    with cache_lock(cache):
        return _cached_gallery(cache) or _embed_gallery(encoders, tsv_path, cache, workers=workers,
                                                         chunk_size=chunk_size, skip_bad=skip_bad, tta=tta)


def _cached_gallery(cache: str) -> GalleryEmbeddings | None:
    final = os.path.join(cache, "gallery.npz")
    cached = load_npz(final, "ids", "features", "skipped")
    if cached is None:
        return None
    skipped = SkippedImages([tuple(x) for x in json.loads(str(cached["skipped"]))])
    log.info("gallery embeddings reused from %s", final)
    return GalleryEmbeddings(cached["ids"], cached["features"], skipped, from_cache=True)


def _completed_chunks(cache: str, n_chunks: int) -> list[dict]:
    """The arrays of the chunks a killed run completed, in order, up to the first one missing."""
    chunks: list[dict] = []
    while len(chunks) < n_chunks:
        loaded = load_npz(os.path.join(cache, f"chunk-{len(chunks):05d}.npz"), "ids", "features", "skipped")
        if loaded is None:
            break
        chunks.append(loaded)
    return chunks


def _embed_gallery(encoders: BundleEncoders, tsv_path: str, cache: str | None, *, workers: int, chunk_size: int,
                   skip_bad: bool, tta: str | None) -> GalleryEmbeddings:
    """Embed the gallery, resuming from and saving to the cache entry `cache` (None: no cache)."""
    tsv = ImageTSV(tsv_path)
    n = len(tsv)
    n_chunks = (n + chunk_size - 1) // chunk_size
    chunks = _completed_chunks(cache, n_chunks) if cache else []
    done = len(chunks)
    if done:
        log.info("resuming the gallery after %d of %d completed chunks", done, n_chunks)
    batch_size = encoders.batch_size
    ranges, chunk_of = [], []  # every batch of the chunks still to embed; a batch never spans two chunks
    for chunk in range(done, n_chunks):
        c0, c1 = chunk * chunk_size, min(n, (chunk + 1) * chunk_size)
        for start in range(c0, c1, batch_size):
            ranges.append((start, min(c1, start + batch_size)))
            chunk_of.append(chunk)
    start_time, embedded = time.time(), 0
    bar = tqdm(total=n, initial=done * chunk_size if done < n_chunks else n, unit="img", desc="embed gallery",
               smoothing=0.1)
    feats, kept, bad = [], [], []
    with DecodeRing(ImageTSV, tsv_path, encoders.image_size, encoders.resize_rule, batch_size, workers,
                    skip_bad) as ring:
        for batch in ring.batches(ranges):
            if batch.count:
                f = encode_gallery_images(encoders, batch.pixels, tta)[:batch.count]
                encoders.require_finite(f, "image", lambda r, pos=batch.positions: f"image {tsv.ids[pos[r]]} "
                                                                                   f"({tsv_path}:{pos[r] + 1})")
                feats.append(f)
            kept.append(batch.positions)
            bad.extend(batch.bad)
            embedded += batch.count
            bar.update(batch.count + len(batch.bad))
            chunk = chunk_of[batch.index]
            if batch.index + 1 == len(ranges) or chunk_of[batch.index + 1] != chunk:  # the chunk is complete
                pos = np.concatenate(kept)
                f = np.concatenate(feats) if feats else np.zeros((0, encoders.dim), np.float32)
                arrays = {"ids": tsv.ids[pos], "features": f, "skipped": np.array(json.dumps(bad))}
                if cache:
                    save_npz(os.path.join(cache, f"chunk-{chunk:05d}.npz"), **arrays)
                chunks.append(arrays)
                feats, kept, bad = [], [], []
    bar.close()
    skipped = SkippedImages([tuple(x) for c in chunks for x in json.loads(str(c["skipped"]))])
    result = GalleryEmbeddings(np.concatenate([c["ids"] for c in chunks]),
                               np.concatenate([c["features"] for c in chunks]).astype(np.float32), skipped)
    if cache:
        save_npz(os.path.join(cache, "gallery.npz"), ids=result.ids, features=result.features,
                 skipped=np.array(json.dumps(skipped.items)))
        for chunk in range(n_chunks):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(cache, f"chunk-{chunk:05d}.npz"))
    seconds = time.time() - start_time
    if embedded:
        log.info("embedded %d images in %.1fs (%.1f images/s)", embedded, seconds, embedded / max(seconds, 1e-9))
    return result


def embed_queries(encoders: BundleEncoders, queries_path: str, cache_root: str):
    """(queries, features) for every query of the file, cached like the gallery."""
    queries = read_queries(queries_path)
    cache = _cache_dir(cache_root, encoders, queries_path, "queries")
    path = os.path.join(cache, "queries.npz")
    cached = load_npz(path, "ids", "features")
    if cached is not None and np.array_equal(cached["ids"], [q.query_id for q in queries]):
        return queries, cached["features"]
    texts = [q.text for q in queries]
    batch_size = encoders.text_batch
    feats = np.concatenate([encoders.encode_text(texts[i:i + batch_size])
                            for i in tqdm(range(0, len(texts), batch_size), desc="embed queries", leave=False)])
    encoders.require_finite(feats, "text", lambda r: f"query {queries[r].query_id} ({queries_path}:{queries[r].line})")
    if cache_writable(cache):
        save_npz(path, ids=np.array([q.query_id for q in queries]), features=feats)
    return queries, feats
