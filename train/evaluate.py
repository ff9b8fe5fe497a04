"""Training-time evaluation: embed the whole valid gallery and every valid query, exact top-10,
and the competition's own scorer. The gallery is decoded by `infra.gallery`, the decoder
predict uses, with the same preprocessing (`competition.preprocess`)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from competition import ImageTSV, SkippedImages, read_queries, score_predictions
from competition.topk import exact_topk, predictions_from_positions
from infra.gallery import DecodeRing

from .precision import autocast

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    """How a model is scored on a split: the run's image preprocessing, the batch, the decode
    workers, the device and the precision."""
    size: int
    rule: str
    batch_size: int
    workers: int
    device: torch.device
    precision: str = "fp32"
    skip_bad: bool = False
    progress: bool = True

    @classmethod
    def of_run(cls, cfg, device: torch.device, precision: str) -> EvalSettings:
        """The settings a run with config `cfg` (`train.config.Config`) evaluates with."""
        return cls(cfg.data.image_size, cfg.data.resize_rule, cfg.eval.batch_size, cfg.data.workers, device,
                   precision, cfg.data.skip_bad_images)


def _decoded_batches(tsv: ImageTSV, settings: EvalSettings, skip_bad: bool, desc: str):
    """The gallery's batches in file order (`infra.gallery.Batch`), behind a progress bar."""
    tsv_path, n, bs = tsv.path, len(tsv), settings.batch_size
    ranges = [(start, min(n, start + bs)) for start in range(0, n, bs)]
    ring = DecodeRing(ImageTSV, tsv_path, settings.size, settings.rule, bs, settings.workers, skip_bad)
    try:
        ring.__enter__()  # starts the workers
    except OSError as exc:  # /dev/shm too small for the workers' slots (Docker's default 64 MiB)
        log.warning("%s; decoding the gallery in this process instead", exc)
        ring = DecodeRing(ImageTSV, tsv_path, settings.size, settings.rule, bs, 0, skip_bad).__enter__()
    try:
        yield from tqdm(ring.batches(ranges), total=len(ranges), desc=desc, disable=not settings.progress,
                        leave=False)
    finally:
        ring.close()


@torch.no_grad()
def gallery_features(model, tsv_path: str, settings: EvalSettings) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, L2-normalised features) of every decodable gallery image, in file order."""
    tsv = ImageTSV(tsv_path)
    feats, kept, skipped = [], [], SkippedImages()
    model.eval()
    for batch in _decoded_batches(tsv, settings, settings.skip_bad, "embed gallery"):
        if batch.count:
            pixels = torch.from_numpy(batch.pixels[:batch.count]).to(settings.device, non_blocking=True)
            with autocast(settings.precision, settings.device):
                feats.append(model.encode_image(pixels).float().cpu().numpy())
            kept.append(batch.positions)
        skipped.items.extend(batch.bad)
    if skipped.items:
        log.warning("%s: %s", tsv_path, skipped.summary())
    if not feats:
        return tsv.ids[:0], np.zeros((0, 0), np.float32)
    return tsv.ids[np.concatenate(kept)], np.concatenate(feats)


def check_gallery(tsv_path: str, settings: EvalSettings) -> None:
    """Decode and resize every image of a gallery (no model): a bad one raises, naming its line."""
    t0, tsv = time.time(), ImageTSV(tsv_path)
    for _ in _decoded_batches(tsv, settings, False, "check valid images"):
        pass
    log.info("checked the %d images of %s in %.1fs", len(tsv), tsv_path, time.time() - t0)


@torch.no_grad()
def embed_texts(model, tokenizer, texts, *, batch_size: int, device, precision: str = "fp32", progress: bool = True):
    model.eval()
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embed queries", disable=not progress, leave=False):
        ids, mask = tokenizer(texts[start:start + batch_size])
        with autocast(precision, device):
            f = model.encode_text(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
        out.append(f.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def evaluate(model, tokenizer, queries_path: str, tsv_path: str, settings: EvalSettings, label: str = "valid"):
    """Score the model on a split with the official metric. Returns competition's `Score`."""
    t0 = time.time()
    queries = read_queries(queries_path, require_ids=True)
    ids, gallery = gallery_features(model, tsv_path, settings)
    q = embed_texts(model, tokenizer, [x.text for x in queries], batch_size=settings.batch_size,
                    device=settings.device, precision=settings.precision, progress=settings.progress)
    _, pos = exact_topk(q, gallery, k=10)
    score = score_predictions(queries, predictions_from_positions(queries, ids, pos))
    log.info("%s: %s [%.1fs, %d images]", label, score.summary(), time.time() - t0, len(ids))
    return score
