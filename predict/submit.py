"""Bundle(s) + split -> embeddings -> exact top-K -> validated submission (and, on valid, the score).

One bundle is the plain chain. Several are an ensemble (`predict.ensemble`); `tta` averages each
gallery image with its mirror; `rerank` re-ranks against a bank of train queries
(`predict.rerank`). Each is off unless asked for, and each keeps the top-K exact.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from competition import ImageTSV, SkippedImages, ground_truth_not_in_gallery, score_predictions, write_submission
from competition.errors import first_of
from competition.layout import split_files, split_paths
from competition.metric import RESULT, success_json, write_result
from competition.submission import SUBMISSION
from competition.topk import exact_topk, predictions_from_positions
from infra.gallery import default_workers
from infra.io import atomic_write_text
from infra.outputs import OutputKind, check_output, json_with_keys

from .embed import embed_gallery, embed_queries
from .ensemble import align, fuse, parse_weights, pick_weights
from .manifest import read_manifest
from .rerank import cached_bank_stats, check_beta, rescorer
from .runtime import BundleEncoders, has_graphs

log = logging.getLogger(__name__)
ENSEMBLE = OutputKind("ensemble record", directory=False,
                      recognise=lambda path: json_with_keys(path, "bundles", "weights"))


@dataclass
class PredictOptions:
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    workers: int = field(default_factory=default_workers)  # decode processes
    batch_size: int | None = None  # images per graph call; None: per device (runtime.DEFAULT_BATCH)
    chunk_size: int = 4096
    skip_bad_images: bool = False
    cache_dir: str = "cache/embeddings"
    schema: str = "tianchi"
    k: int = 10
    tta: str | None = None          # "hflip": each gallery image is the mean of it and its mirror
    weights: str | None = None      # ensembles: "0.6,0.4" (one per bundle) or "auto" (picked on valid); None: equal
    rerank: str | None = None       # "qbnorm" | "dual-softmax", against the `bank` queries
    rerank_beta: float | None = None  # None: the bundles' logit scale (their trained inverse temperature)
    bank: str | None = None         # the query bank (a queries file); None: the data's train queries
    overwrite: bool | None = None   # --out may replace a file that is not an earlier submission (`infra.outputs`)


@dataclass
class SplitEmbeddings:
    queries: list
    query_features: list[np.ndarray]    # per bundle
    gallery_ids: np.ndarray
    gallery_features: list[np.ndarray]  # per bundle, rows in `gallery_ids` order
    skipped: SkippedImages
    cached: bool
    seconds: float


def embed_split(encoders: list[BundleEncoders], data_dir: str, split: str, opts: PredictOptions) -> SplitEmbeddings:
    """Each bundle's embeddings of a split's queries and gallery (cached per bundle)."""
    queries_path, tsv_path = split_files(data_dir, split)
    t0, galleries, query_features, queries = time.time(), [], [], None
    for enc in encoders:
        galleries.append(embed_gallery(enc, tsv_path, opts.cache_dir, workers=opts.workers,
                                       chunk_size=opts.chunk_size, skip_bad=opts.skip_bad_images, tta=opts.tta))
        queries, feats = embed_queries(enc, queries_path, opts.cache_dir)
        query_features.append(feats)
    seconds = time.time() - t0
    ids, features = align([g.ids for g in galleries], [g.features for g in galleries])
    if len(ids) < opts.k:
        raise ValueError(f"{tsv_path}: only {len(ids)} usable images; a submission needs {opts.k} per query")
    return SplitEmbeddings(queries, query_features, ids, features, galleries[0].skipped,
                           all(g.from_cache for g in galleries), seconds)


def _weights(encoders, data_dir: str, split: str, emb: SplitEmbeddings, opts: PredictOptions):
    """(weights, how they were chosen as a record) for this ensemble."""
    weights = parse_weights(opts.weights, len(encoders))
    if weights != "auto":
        return weights, {"weights": list(weights), "chosen": "given" if opts.weights else "equal"}
    valid = emb if split == "valid" else embed_split(encoders, data_dir, "valid", opts)
    if any(q.item_ids is None for q in valid.queries):
        raise ValueError(f"--weights auto needs ground truth: {split_files(data_dir, 'valid')[0]} has queries "
                         "without item_ids")
    t0 = time.time()
    weights, table = pick_weights(valid.queries, valid.query_features, valid.gallery_ids, valid.gallery_features,
                                  opts.k)
    log.info("--weights auto: %s (valid MR %.2f, best of %d grid points in %.1fs)%s",
             ",".join(f"{w:g}" for w in weights), max(r["mean_recall"] for r in table), len(table),
             time.time() - t0, "; picked on the split being scored, so its score is optimistic"
             if split == "valid" else "")
    return weights, {"weights": list(weights), "chosen": "auto (valid grid)", "grid": table}


def bank_path(opts: PredictOptions, data_dir: str) -> str:
    """The re-ranking bank: --bank, or the data's train queries (the train images are not needed)."""
    path = opts.bank or split_paths(data_dir, "train")[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --rerank needs a bank of queries (--bank FILE, or the train "
                                "queries in --data)")
    return path


def check_options(dirs: list[str], data_dir: str, split: str, out_path: str, opts: PredictOptions) -> None:
    """Every argument checked before anything is embedded: weights, re-ranking, cache, output."""
    parse_weights(opts.weights, len(dirs))
    if opts.rerank:
        if opts.rerank_beta is not None:
            check_beta(opts.rerank_beta)
        queries_path = split_paths(data_dir, split)[0]
        if os.path.isfile(queries_path) and os.path.samefile(bank_path(opts, data_dir), queries_path):
            raise ValueError(f"--bank {queries_path} is the file of the queries being answered: the bank is other "
                             "queries (the train queries by default), never the ones being ranked")
    if os.path.exists(opts.cache_dir) and not os.path.isdir(opts.cache_dir):
        raise ValueError(f"--cache-dir {opts.cache_dir} is a file, not a directory")
    sources = [*dirs, data_dir, opts.bank]
    check_output(out_path, SUBMISSION, sources, opts.overwrite)
    stem = os.path.splitext(out_path)[0]  # what is written beside the submission
    check_output(stem + ".result.json", RESULT, sources, opts.overwrite, flag="--out's result file")
    if len(dirs) > 1:
        check_output(stem + ".ensemble.json", ENSEMBLE, sources, opts.overwrite, flag="--out's ensemble record")


def _memory_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def image_batch(requested: int | None, tsv_path: str, bundle_dir: str, workers: int) -> int | None:
    """The image batch predict runs (None: the device's default): never more images than the
    gallery has (a larger batch would be padding alone), and refused, naming --batch-size, when
    the decode ring's slots for it would take more than half the memory available."""
    if requested is None:
        return None
    images = len(ImageTSV(tsv_path))
    batch = max(1, min(requested, images))
    if batch < requested:
        log.info("--batch-size %d is more than the gallery's %d images: running batches of %d", requested, images,
                 batch)
    size = read_manifest(bundle_dir).image_size
    slots = 2 * workers if workers else 1
    need, available = slots * batch * size * size * 3, _memory_available()
    if available is not None and need > available // 2:
        raise ValueError(f"--batch-size {requested}: {slots} decode slots of {batch} images at {size} px take "
                         f"{need / 2**30:.1f} GiB, more than half the {available / 2**30:.1f} GiB of memory "
                         "available; lower --batch-size (128 is plenty on a GPU) or --workers")
    return batch


def _rescore(encoders, data_dir: str, weights, queries, qfeat: np.ndarray, gallery: np.ndarray,
             opts: PredictOptions):
    """The re-ranking's `rescore` for `exact_topk`, and a record of its settings. Bank queries
    that are among the queries being answered (same id and text) are left out of the bank."""
    path = bank_path(opts, data_dir)
    bank_queries, features = [], []
    for enc in encoders:
        bank_queries, feats = embed_queries(enc, path, opts.cache_dir)
        features.append(feats)
    answered = {(q.query_id, q.text) for q in queries}
    keep = np.array([(q.query_id, q.text) not in answered for q in bank_queries], dtype=bool)
    if not keep.any():
        raise ValueError(f"--bank {path}: every query in it is one being answered; the bank must be other queries")
    if not keep.all():
        log.warning("--bank %s: left %d queries out of the bank: they are among the queries being answered", path,
                    int((~keep).sum()))
    bank = fuse([f[keep] for f in features], weights)
    beta = opts.rerank_beta or float(np.dot(weights, [enc.manifest.inverse_temperature for enc in encoders]))
    stats = cached_bank_stats(bank, gallery, beta, opts.cache_dir)
    record = {"method": opts.rerank, "beta": round(beta, 4), "bank": path, "bank_queries": len(bank),
              "bank_left_out": int((~keep).sum())}
    return rescorer(opts.rerank, qfeat, gallery, stats, beta), record


def _score_split(split: str, queries, preds: dict, gallery_ids: np.ndarray, files: tuple[str, str],
                 out_path: str) -> dict:
    """On a split whose every query has ground truth: its score as the evaluator gives it, written
    to `<out>.result.json`; {} on one without (a test split)."""
    queries_path, tsv_path = files
    lacking = [q.line for q in queries if q.item_ids is None]
    if lacking and len(lacking) < len(queries):
        log.warning("%s: %d of %d queries have no item_ids (lines %s): the split is not scored", queries_path,
                    len(lacking), len(queries), first_of(lacking))
    if lacking or not queries:
        return {}
    absent = ground_truth_not_in_gallery(queries, set(gallery_ids.tolist()).__contains__)
    if absent:
        log.warning("%d ground-truth id(s) of %s are not among the %d embedded images of %s, so their queries "
                    "can miss however good the model (query:id %s)", len(absent), queries_path, len(gallery_ids),
                    tsv_path, first_of([f"{q.query_id}:{i}" for q, i in absent]))
    score = score_predictions(queries, preds)
    result_path = os.path.splitext(out_path)[0] + ".result.json"
    write_result(result_path, success_json(score))
    log.info("%s: %s", split, score.summary())
    return {**score.as_dict(), "result": result_path}


def predict_split(bundle_dirs, data_dir: str, split: str, out_path: str, opts: PredictOptions | None = None,
                  encoders=None) -> dict:
    """Write the top-K submission for `split` from one bundle (a path) or an ensemble (a list of
    paths); on a split with ground truth also score it and write `<out>.result.json`; an
    ensemble's weights go to `<out>.ensemble.json`. Returns a summary."""
    t0 = time.time()
    opts = opts or PredictOptions()
    dirs = [bundle_dirs] if isinstance(bundle_dirs, (str, os.PathLike)) else list(bundle_dirs)
    queries_path, tsv_path = split_files(data_dir, split)
    check_options(dirs, data_dir, split, out_path, opts)
    if encoders is None:
        encoders = [BundleEncoders(d, opts.device, opts.precision, opts.threads,
                                   batch_size=image_batch(opts.batch_size, tsv_path, d, opts.workers)) for d in dirs]
    elif not isinstance(encoders, (list, tuple)):
        encoders = [encoders]
    for d, enc in zip(dirs, encoders):
        log.info("predicting %s with %s on %s", split, d, enc.describe())
        if enc.choice.precision == "fp32" and has_graphs(enc.manifest, "int8"):
            log.info("this bundle also has gated int8 graphs: --precision int8 runs them (faster on CPUs with "
                     "VNNI; see the manifest's parity report)")
        if enc.choice.device == "cuda":
            log.info("warmed up %d input shapes on CUDA in %.1fs", 1 + len(enc.lengths), enc.warmup())
    emb = embed_split(encoders, data_dir, split, opts)
    if emb.skipped.items:
        log.warning("%s", emb.skipped.summary())
    queries, gallery_ids = emb.queries, emb.gallery_ids
    weights, ensemble = _weights(encoders, data_dir, split, emb, opts)
    qfeat, gfeat = fuse(emb.query_features, weights), fuse(emb.gallery_features)
    rescore, rerank = (_rescore(encoders, data_dir, weights, queries, qfeat, gfeat, opts) if opts.rerank
                       else (None, None))
    t1 = time.time()
    _, pos = exact_topk(qfeat, gfeat, k=opts.k, rescore=rescore)
    topk_s = time.time() - t1
    preds = predictions_from_positions(queries, gallery_ids, pos)
    write_submission(out_path, queries, preds, schema=opts.schema, k=opts.k)
    summary = {"split": split, "submission": out_path, "queries": len(queries), "gallery": len(gallery_ids),
               "skipped_images": len(emb.skipped.items), "gallery_cached": emb.cached,
               "gallery_s": round(emb.seconds, 2), "topk_s": round(topk_s, 3),
               "total_s": round(time.time() - t0, 1), "runtime": encoders[0].describe()}
    if opts.tta:
        summary["tta"] = opts.tta
    if rerank:
        summary["rerank"] = rerank
    if len(encoders) > 1:
        ensemble = {"bundles": [os.path.abspath(d) for d in dirs], **ensemble}
        record = os.path.splitext(out_path)[0] + ".ensemble.json"
        atomic_write_text(record, json.dumps(ensemble, indent=1, ensure_ascii=False) + "\n")
        summary.update(weights=ensemble["weights"], ensemble=record)

    summary.update(_score_split(split, queries, preds, gallery_ids, (queries_path, tsv_path), out_path))
    log.info("wrote %s (%d queries, top-%d in %.2fs) in %.1fs", out_path, len(queries), opts.k, topk_s,
             time.time() - t0)
    return summary
