"""Training-time evaluation: embed the whole valid gallery and every valid query, exact top-10,
and the competition's own scorer. Preprocessing is `competition.preprocess`, as in `predict`."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from tqdm import tqdm

from competition import read_queries, score_predictions
from competition.topk import exact_topk

from .data import GalleryImages, gallery_loader
from .precision import autocast

log = logging.getLogger(__name__)


@torch.no_grad()
def embed_gallery(model, tsv_path: str, *, size: int, rule: str, batch_size: int, workers: int, device,
                  precision: str = "fp32", skip_bad: bool = False, progress: bool = True):
    """(image ids, L2-normalised features) of every decodable gallery image, in file order."""
    dataset = GalleryImages(tsv_path, size, rule, skip_bad)
    feats = np.zeros((len(dataset), 0), np.float32)
    keep = np.ones(len(dataset), bool)
    model.eval()
    for pixels, idx, ok in tqdm(gallery_loader(dataset, batch_size, workers, device), desc="embed gallery",
                                disable=not progress, leave=False):
        with autocast(precision, device):
            f = model.encode_image(pixels.to(device, non_blocking=True)).float().cpu().numpy()
        if feats.shape[1] == 0:
            feats = np.zeros((len(dataset), f.shape[1]), np.float32)
        feats[idx.numpy()] = f
        keep[idx.numpy()] = ok.numpy()
    return dataset.tsv.ids[keep], feats[keep]


def check_gallery(tsv_path: str, *, size: int, rule: str, batch_size: int, workers: int, device) -> None:
    """Decode and resize every image of a gallery (no model): a bad one raises, naming its line."""
    t0 = time.time()
    dataset = GalleryImages(tsv_path, size, rule)
    for _ in tqdm(gallery_loader(dataset, batch_size, workers, device), desc="check valid images", leave=False):
        pass
    log.info("checked the %d images of %s in %.1fs", len(dataset), tsv_path, time.time() - t0)


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


def evaluate(model, tokenizer, queries_path: str, tsv_path: str, *, size: int, rule: str, batch_size: int,
             workers: int, device, precision: str = "fp32", skip_bad: bool = False, progress: bool = True,
             label: str = "valid"):
    """Score the model on a split with the official metric. Returns competition's `Score`."""
    t0 = time.time()
    queries = read_queries(queries_path, require_ids=True)
    ids, gallery = embed_gallery(model, tsv_path, size=size, rule=rule, batch_size=batch_size, workers=workers,
                                 device=device, precision=precision, skip_bad=skip_bad, progress=progress)
    q = embed_texts(model, tokenizer, [x.text for x in queries], batch_size=batch_size, device=device,
                    precision=precision, progress=progress)
    _, pos = exact_topk(q, gallery, k=10)
    preds = {x.query_id: ids[row].tolist() for x, row in zip(queries, pos)}
    score = score_predictions(queries, preds)
    log.info("%s: %s [%.1fs, %d images]", label, score.summary(), time.time() - t0, len(ids))
    return score
