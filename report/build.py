"""`muge report`: one self-contained HTML file for looking at what a model gets right and wrong.

Scores, per-query first-hit ranks, top-10 lists and thumbnails (base64 JPEG) go into one JSON
blob inside the page; the page's own script (`template.html`) renders the summary and pages of
query cards from it, so 5,000 queries stay responsive and the file makes no external request.
Only images that some query shows (a top-10 entry or a missed ground truth) are thumbnailed.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import resources

import numpy as np

from competition import ImageTSV, MugeDataError, Query, Score, check_submission, read_queries, score_predictions
from infra.history import HISTORY, read_history
from infra.io import atomic_write_text
from infra.outputs import OutputKind, check_output, read_head
from predict.manifest import MANIFEST, BundleError, read_manifest

log = logging.getLogger(__name__)
MISSED_SHOWN = 10  # missed ground-truth thumbnails per query (the count is always shown)


@dataclass
class Predictions:
    name: str
    path: str
    items: dict[int, list[int]]
    score: Score

    def rank_of(self) -> dict[int, int]:
        """query id -> 1-based rank of the first hit, 0 for a miss."""
        return dict(zip(self.score.query_ids.tolist(), self.score.first_hit.tolist()))


def load_predictions(gt: list[Query], queries_path: str, path: str, name: str) -> Predictions:
    """A prediction file checked as the reference evaluator would, then scored against `gt`
    (the queries of `queries_path`)."""
    report = check_submission(queries_path, path, queries=gt)
    if not report.ok:
        raise MugeDataError(path, "not a valid prediction file for these queries: " + "; ".join(report.errors[:3]))
    return Predictions(name, path, {q: [int(i) for i in ids] for q, ids in report.predictions.items()},
                       score_predictions(gt, report.predictions))


def first_hit_histogram(first_hit: np.ndarray) -> list[int]:
    """Queries whose first hit is at rank 1..10, then the misses."""
    counts = np.bincount(first_hit, minlength=11)
    return [int(c) for c in counts[1:11]] + [int(counts[0])]


def _thumbs_of(args) -> dict[int, str | None]:
    tsv_path, ids, size, quality = args
    tsv = ImageTSV(tsv_path)
    out: dict[int, str | None] = {}
    for img_id in ids:
        try:
            img = tsv.load(img_id, draft=size)
        except MugeDataError as err:
            log.warning("no thumbnail: %s", err)
            out[img_id] = None
            continue
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality, optimize=True)
        out[img_id] = base64.b64encode(buf.getvalue()).decode("ascii")
    return out


def thumbnails(tsv_path: str, ids, size: int = 64, quality: int = 70, workers: int | None = None,
               progress: bool = True) -> dict[int, str | None]:
    """img id -> base64 JPEG thumbnail (None: undecodable); ids not in the gallery are left out."""
    from tqdm import tqdm

    tsv = ImageTSV(tsv_path)  # builds (or loads) the index once, before the workers need it
    present = sorted(int(i) for i in ids if i in tsv)
    chunks = [present[i:i + 512] for i in range(0, len(present), 512)]
    workers = workers or os.cpu_count() or 1
    out: dict[int, str | None] = {}
    bar = tqdm(total=len(present), desc=f"thumbnails ({size}px)", unit="img", disable=not progress, leave=False)
    if workers == 1 or len(chunks) < 2:
        for chunk in chunks:
            out.update(_thumbs_of((tsv_path, chunk, size, quality)))
            bar.update(len(chunk))
    else:
        with ProcessPoolExecutor(workers) as pool:
            for part in pool.map(_thumbs_of, [(tsv_path, c, size, quality) for c in chunks]):
                out.update(part)
                bar.update(len(part))
    bar.close()
    return out


def report_history(run_dir: str | None) -> list[dict]:
    """The run's per-epoch records (`infra.history`), JSON-ready; a bundle directory leads to
    its run."""
    if not run_dir:
        return []
    from_bundle = os.path.isfile(os.path.join(run_dir, MANIFEST))
    if from_bundle:
        try:
            source = read_manifest(run_dir).source_checkpoint
        except BundleError as exc:
            raise MugeDataError(None, str(exc)) from None
        if source is None:  # `muge export --pretrained`: no run, no curves
            return []
        run_dir = os.path.dirname(source)
    path = os.path.join(run_dir, HISTORY)
    if not os.path.isfile(path):
        if from_bundle:  # the bundle travelled without its run: no curves, but still a report
            log.warning("%s not found (the run the bundle came from): no training curves", path)
            return []
        raise FileNotFoundError(f"{path} not found: --run expects a training run (or bundle) directory")
    return [r.to_dict() for r in read_history(path)]


def report_data(queries_path: str, images_path: str, pred_paths: list[str], run_dir: str | None = None,
                thumb_size: int = 64, quality: int = 70, workers: int | None = None) -> dict:
    """Everything the page shows, as one JSON-able dict."""
    if not 1 <= len(pred_paths) <= 2:
        raise ValueError("give one prediction file, or two to compare")
    queries = read_queries(queries_path, require_ids=True)
    runs = [load_predictions(queries, queries_path, p, n) for p, n in zip(pred_paths, "AB")]
    ranks = [r.rank_of() for r in runs]
    shown: set[int] = set()
    rows = []
    for q in (q for q in queries if q.item_ids):
        truth = set(q.item_ids)
        tops = [r.items[q.query_id][:10] for r in runs]
        missed = [[i for i in q.item_ids if i not in top_set] for top_set in map(set, tops)]
        for top, miss in zip(tops, missed):
            shown.update(top)
            shown.update(miss[:MISSED_SHOWN])
        rows.append({"id": q.query_id, "text": q.text, "gt": sorted(truth), "top": tops,
                     "rank": [rk[q.query_id] for rk in ranks], "missed": missed})
    start = time.time()
    thumbs = thumbnails(images_path, shown, thumb_size, quality, workers)
    log.info("%d thumbnails in %.1fs", len(thumbs), time.time() - start)
    return {
        "title": " vs ".join(os.path.basename(p) for p in pred_paths),
        "generated": time.strftime("%Y-%m-%d %H:%M"),
        "queries_path": queries_path, "images_path": images_path,
        "runs": [{"name": r.name, "path": r.path, "metrics": r.score.as_dict(),
                  "histogram": first_hit_histogram(r.score.first_hit)} for r in runs],
        "history": report_history(run_dir), "run_dir": run_dir,
        "missed_shown": MISSED_SHOWN, "thumb_size": thumb_size,
        "queries": rows, "thumbs": {str(k): v for k, v in thumbs.items()},
    }


# In the JSON blob inside <script>, <, > and & become \u escapes: no text (a query holding
# "<!--<script>", say) can end the script element or change how the HTML parser reads it.
_SCRIPT_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})
_PLACEHOLDER = re.compile(r"__TITLE__|__DATA__")


def render(data: dict) -> str:
    template = resources.files(__package__).joinpath("template.html").read_text(encoding="utf-8")
    blob = json.dumps(_finite(data), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    values = {"__TITLE__": _escape(data["title"]), "__DATA__": blob.translate(_SCRIPT_SAFE)}
    return _PLACEHOLDER.sub(lambda m: values[m.group()], template)  # one pass: no value is searched again


def _finite(value):
    """`value` with NaN and infinities (a diverged run's loss, say) as null: Python writes them bare,
    which is not JSON, and the browser's JSON.parse would throw and show nothing."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


GENERATOR = '<meta name="generator" content="muge-retrieval report">'  # in every report's head
REPORT = OutputKind("report", directory=False, recognise=lambda path: GENERATOR in read_head(path, 4096)
                    or "<title>MUGE report:" in read_head(path, 4096))  # (the second: reports before the tag)


def write_report(out_path: str, overwrite: bool | None = None, **kwargs) -> dict:
    """Build and write the report atomically (a new file, or an earlier report: replaced; anything
    else only with `overwrite`, never an input); returns a summary (sizes, counts)."""
    inputs = [kwargs.get("queries_path"), kwargs.get("images_path"), *kwargs.get("pred_paths", ()),
              kwargs.get("run_dir")]
    check_output(out_path, REPORT, inputs, overwrite)
    data = report_data(**kwargs)
    html = render(data)
    atomic_write_text(out_path, html)
    return {"bytes": len(html.encode("utf-8")), "queries": len(data["queries"]), "thumbnails": len(data["thumbs"]),
            "metrics": {r["name"]: r["metrics"] for r in data["runs"]}}
