"""Gallery and query embeddings with ONNX Runtime, cached on disk.

Gallery images are decoded and resized in a pool of worker processes (by byte offset from the
TSV index, so only pixels cross the process boundary) while the main process runs the image
graph: at most `2 x workers` decode tasks are in flight, so memory stays bounded whatever the
gallery size. Embeddings are saved per chunk of TSV lines under a key made of the bundle's
hash and the input file's fingerprint; a rerun reuses them and a run killed mid-gallery
resumes from its last completed chunk. Processes that share a cache directory (a team on one
box, `make -j`) take turns on a gallery through a lock file: the second waits, then reuses
what the first wrote.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from competition import ImageTSV, MugeDataError, SkippedImages, read_queries, resize_image
from competition.io import atomic_path, content_fingerprint

from .runtime import BundleEncoders

log = logging.getLogger(__name__)


def _open_tsv(tsv_path: str) -> ImageTSV:
    """This process's handle on a gallery: each worker opens its own (cached index, own
    descriptor), once per version of the file (its content fingerprint)."""
    return _open_tsv_version(tsv_path, content_fingerprint(tsv_path))


@functools.lru_cache(maxsize=4)
def _open_tsv_version(tsv_path: str, fingerprint: str) -> ImageTSV:
    return ImageTSV(tsv_path)


def file_fingerprint(path: str) -> str:
    """The file's path, size, mtime and a sample of its content: a TSV edited in place that keeps
    its size and mtime gets new embeddings, not the old ones."""
    return hashlib.sha256(f"{os.path.abspath(path)}|{content_fingerprint(path)}".encode()).hexdigest()[:16]


def decode_range(tsv_path: str, start: int, end: int, size: int, rule: str, skip_bad: bool):
    """Decode + resize TSV positions [start, end) -> (uint8 pixels, kept positions, bad list)."""
    tsv = _open_tsv(tsv_path)
    pixels, kept, bad = [], [], []
    for pos in range(start, end):
        img_id = int(tsv.ids[pos])
        try:
            pixels.append(resize_image(tsv.load(img_id), size, rule))
            kept.append(pos)
        except MugeDataError as err:
            if not skip_bad:
                raise
            bad.append((img_id, err.line or pos + 1, err.reason))
    arr = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
    return arr, np.asarray(kept, np.int64), bad


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
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, ".lock"), os.O_CREAT | os.O_RDWR, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is embedding into %s: waiting for it, then reusing its work", directory)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
    with cache_lock(cache):
        return _embed_gallery(encoders, tsv_path, cache, workers=workers, chunk_size=chunk_size, skip_bad=skip_bad,
                              tta=tta)


def _embed_gallery(encoders: BundleEncoders, tsv_path: str, cache: str, *, workers: int, chunk_size: int,
                   skip_bad: bool, tta: str | None) -> GalleryEmbeddings:
    final = os.path.join(cache, "gallery.npz")
    cached = load_npz(final, "ids", "features", "skipped")
    if cached is not None:
        skipped = SkippedImages([tuple(x) for x in json.loads(str(cached["skipped"]))])
        log.info("gallery embeddings reused from %s", final)
        return GalleryEmbeddings(cached["ids"], cached["features"], skipped, from_cache=True)
    os.makedirs(cache, exist_ok=True)
    tsv = ImageTSV(tsv_path)
    n = len(tsv)
    n_chunks = (n + chunk_size - 1) // chunk_size
    chunks: list[dict] = []  # the completed chunks, read once
    while len(chunks) < n_chunks:
        loaded = load_npz(os.path.join(cache, f"chunk-{len(chunks):05d}.npz"), "ids", "features", "skipped")
        if loaded is None:
            break
        chunks.append(loaded)
    done = len(chunks)
    if done:
        log.info("resuming the gallery after %d of %d completed chunks", done, n_chunks)
    size, rule, batch_size = encoders.image_size, encoders.resize_rule, encoders.batch_size
    # spawn, not fork: a forked child can inherit a lock held by one of the parent's threads
    # (ONNX Runtime, tqdm, the import lock) and hang
    pool = mp.get_context("spawn").Pool(workers, initializer=_ignore_interrupts) if workers > 0 else None
    t0, embedded = time.time(), 0

    def submit(r):  # a decode task: async in the pool, or deferred to `fetch` without one
        return pool.apply_async(decode_range, (tsv_path, *r, size, rule, skip_bad)) if pool else r

    def fetch(task):
        return task.get() if pool else decode_range(tsv_path, *task, size, rule, skip_bad)

    def describe(pos):
        return lambda r: f"image {tsv.ids[pos[r]]} ({tsv_path}:{pos[r] + 1})"

    try:
        bar = tqdm(total=n, initial=done * chunk_size if done < n_chunks else n, unit="img", desc="embed gallery",
                   smoothing=0.1)
        for chunk in range(done, n_chunks):
            c0, c1 = chunk * chunk_size, min(n, (chunk + 1) * chunk_size)
            feats, kept, bad = [], [], []
            ranges = [(s, min(c1, s + batch_size)) for s in range(c0, c1, batch_size)]
            it = iter(ranges)
            inflight = collections.deque(submit(r) for r in itertools.islice(it, 2 * max(1, workers)))  # bounded
            while inflight:
                pixels, pos, b = fetch(inflight.popleft())
                nxt = next(it, None)
                if nxt is not None:  # keep the workers busy while this batch runs on the encoder
                    inflight.append(submit(nxt))
                if len(pixels):
                    f = encode_gallery_images(encoders, pixels, tta)
                    encoders.require_finite(f, "image", describe(pos))
                    feats.append(f)
                kept.append(pos)
                bad.extend(b)
                embedded += len(pixels)
                bar.update(len(pos) + len(b))
            pos = np.concatenate(kept) if kept else np.zeros(0, np.int64)
            f = np.concatenate(feats) if feats else np.zeros((0, encoders.dim), np.float32)
            arrays = {"ids": tsv.ids[pos], "features": f, "skipped": np.array(json.dumps(bad))}
            save_npz(os.path.join(cache, f"chunk-{chunk:05d}.npz"), **arrays)
            chunks.append(arrays)
        bar.close()
    finally:
        if pool:
            pool.terminate()
            pool.join()
    skipped = SkippedImages([tuple(x) for c in chunks for x in json.loads(str(c["skipped"]))])
    result = GalleryEmbeddings(np.concatenate([c["ids"] for c in chunks]),
                               np.concatenate([c["features"] for c in chunks]).astype(np.float32), skipped)
    save_npz(final, ids=result.ids, features=result.features, skipped=np.array(json.dumps(skipped.items)))
    for chunk in range(n_chunks):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(cache, f"chunk-{chunk:05d}.npz"))
    dt = time.time() - t0
    if embedded:
        log.info("embedded %d images in %.1fs (%.1f images/s)", embedded, dt, embedded / max(dt, 1e-9))
    return result


def _ignore_interrupts() -> None:
    """Decode workers leave Ctrl-C to the main process, which stops them (no traceback from each)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
    os.makedirs(cache, exist_ok=True)
    save_npz(path, ids=np.array([q.query_id for q in queries]), features=feats)
    return queries, feats
