"""Bundle + split -> embeddings -> exact top-K -> validated submission (and, on valid, the score)."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from competition import ground_truth_not_in_gallery, score_predictions, write_submission
from competition.errors import first_of
from competition.layout import split_files
from competition.metric import success_json, write_result
from competition.topk import exact_topk

from .embed import embed_gallery, embed_queries
from .runtime import BundleEncoders, has_graphs

log = logging.getLogger(__name__)


@dataclass
class PredictOptions:
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    workers: int = 2
    batch_size: int | None = None  # images per graph call; None: per device (runtime.DEFAULT_BATCH)
    chunk_size: int = 4096
    skip_bad_images: bool = False
    cache_dir: str = "cache/embeddings"
    schema: str = "tianchi"
    k: int = 10


def predict_split(bundle_dir: str, data_dir: str, split: str, out_path: str, opts: PredictOptions | None = None,
                  encoders: BundleEncoders | None = None) -> dict:
    """Write the top-K submission for `split`; on a split with ground truth also score it and
    write `<out>.result.json`. Returns a summary."""
    t0 = time.time()
    opts = opts or PredictOptions()
    queries_path, tsv_path = split_files(data_dir, split)
    enc = encoders or BundleEncoders(bundle_dir, opts.device, opts.precision, opts.threads,
                                     batch_size=opts.batch_size)
    log.info("predicting %s with %s on %s", split, bundle_dir, enc.describe())
    if enc.choice.precision == "fp32" and has_graphs(enc.manifest, "int8"):
        log.info("this bundle also has gated int8 graphs: --precision int8 runs them (faster on CPUs with "
                 "VNNI; see the manifest's parity report)")
    if enc.choice.device == "cuda":
        log.info("warmed up %d input shapes on CUDA in %.1fs", 1 + len(enc.lengths), enc.warmup())
    t_gallery = time.time()
    gallery = embed_gallery(enc, tsv_path, opts.cache_dir, workers=opts.workers, chunk_size=opts.chunk_size,
                            skip_bad=opts.skip_bad_images)
    t_gallery = time.time() - t_gallery
    if gallery.skipped.items:
        log.warning("%s", gallery.skipped.summary())
    if len(gallery.ids) < opts.k:
        raise ValueError(f"{tsv_path}: only {len(gallery.ids)} usable images; a submission needs {opts.k} per query")
    queries, qfeat = embed_queries(enc, queries_path, opts.cache_dir)
    t1 = time.time()
    _, pos = exact_topk(qfeat, gallery.features, k=opts.k)
    topk_s = time.time() - t1
    preds = {q.query_id: gallery.ids[row].tolist() for q, row in zip(queries, pos)}
    write_submission(out_path, queries, preds, schema=opts.schema, k=opts.k)
    summary = {"split": split, "submission": out_path, "queries": len(queries), "gallery": len(gallery.ids),
               "skipped_images": len(gallery.skipped.items), "gallery_cached": gallery.from_cache,
               "gallery_seconds": round(t_gallery, 2), "topk_seconds": round(topk_s, 3),
               "seconds": round(time.time() - t0, 1), "runtime": enc.describe()}
    truth = [q for q in queries if q.item_ids is not None]
    if truth and len(truth) < len(queries):
        lacking = [q.line for q in queries if q.item_ids is None]
        log.warning("%s: %d of %d queries have no item_ids (lines %s): the split is not scored", queries_path,
                    len(lacking), len(queries), first_of(lacking))
    if truth and len(truth) == len(queries):  # ground truth present: score it like the evaluator
        absent = ground_truth_not_in_gallery(queries, set(gallery.ids.tolist()).__contains__)
        if absent:
            log.warning("%d ground-truth id(s) of %s are not among the %d embedded images of %s, so their queries "
                        "can miss however good the model (query:id %s)", len(absent), queries_path, len(gallery.ids),
                        tsv_path, first_of([f"{q.query_id}:{i}" for q, i in absent]))
        score = score_predictions(queries, preds)
        result_path = os.path.splitext(out_path)[0] + ".result.json"
        write_result(result_path, success_json(score))
        summary.update(score.as_dict(), result=result_path)
        log.info("%s: %s", split, score.summary())
    log.info("wrote %s (%d queries, top-%d in %.2fs) in %.1fs", out_path, len(queries), opts.k, topk_s,
             time.time() - t0)
    return summary
