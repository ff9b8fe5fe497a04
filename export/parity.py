"""The parity gate: the bundle must reproduce the PyTorch model on real valid-split inputs.

The gate's subset: the first `queries` valid queries, and a gallery of the positives of the
leading ones (while they fit in half of `gallery` images) filled up with other valid images.
Checks, each against `ParityLimits`:
- fp32 ONNX vs PyTorch: max |diff| of text and image embeddings.
- fp16 ONNX vs PyTorch: per-row cosine of text and image embeddings.
- Ranking, tie-aware: fp16 may reorder near-ties, so an id in fp16's top 10 that is not in
  PyTorch's is accepted only when its PyTorch score is within 2 x the fp16 score error of
  PyTorch's 10th score: the intruder and the id it displaced may each be off by that error. The
  score error is the 99th percentile of |fp16 score - PyTorch score| along a typical query's
  row (the median over queries), or a typical image's column when that is smaller, so that a
  few broken queries or images cannot inflate it and excuse themselves. The figure is the share
  of fp16 top-10 ids so explained. Raw top-10 overlap is reported as information only: it
  punishes near-ties that fp16 legitimately reorders.
- Recall: MeanRecall (x100) of fp16 vs PyTorch on the queries whose positives are in the subset
  gallery, within a tolerance of `fp16_max_recall_delta` points, or one query's worth
  (100 / queries scored) when that is larger.
- int8 graphs (`muge export --int8`), when the bundle has them: the same cosine, ranking and
  recall checks against PyTorch, with the `int8_*` limits (int8 weights move scores more).
- Every output finite: a NaN or inf embedding fails the gate, naming the graph and the input.
The bundle is run through `predict.runtime`, i.e. exactly as `muge predict` will run it.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from competition import ImageTSV, read_queries, resize_image, score_predictions
from competition.topk import exact_topk, first_nonfinite_row
from predict.runtime import BundleEncoders, RuntimeChoice, choose_runtime, has_graphs

log = logging.getLogger(__name__)


@dataclass
class ParityLimits:
    fp32_max_abs: float = 1e-4
    fp16_min_cosine: float = 0.999
    fp16_min_tie_aware: float = 0.99
    fp16_max_recall_delta: float = 1.0  # MeanRecall points (x100) on the gate's subset
    int8_min_cosine: float = 0.98
    int8_min_tie_aware: float = 0.95
    int8_max_recall_delta: float = 2.0


@dataclass
class ParitySettings:
    queries: int = 300
    gallery: int = 1000
    batch_size: int = 32


class ParityError(RuntimeError):
    def __init__(self, report: dict):
        self.report = report
        super().__init__("parity gate failed: " + "; ".join(report["failures"]))


def gate_subset(queries_path: str, tsv: ImageTSV, settings: ParitySettings):
    """(query texts, gallery ids, {row in texts: query} scored for recall): see the module docstring."""
    queries = read_queries(queries_path)[:settings.queries]
    n_gallery = min(settings.gallery, len(tsv))
    chosen: dict[int, None] = {}  # insertion-ordered set
    scored = {}
    for row, q in enumerate(queries):
        positives = [i for i in (q.item_ids or ()) if i in tsv]
        new = [i for i in positives if i not in chosen]
        if positives and len(chosen) + len(new) <= n_gallery // 2:
            chosen.update(dict.fromkeys(new))
            scored[row] = q
    for img_id in tsv.ids.tolist():
        if len(chosen) >= n_gallery:
            break
        chosen.setdefault(img_id)
    return [q.text for q in queries], list(chosen), scored


def ranking_agreement(ref_q: np.ndarray, ref_g: np.ndarray, cand_q: np.ndarray, cand_g: np.ndarray,
                      k: int = 10) -> dict:
    """Compare the candidate's top-k lists with the reference's, tie-aware (module docstring).
    Returns the figures and both top-k position arrays."""
    ref, cand = ref_q @ ref_g.T, cand_q @ cand_g.T
    err = np.abs(cand - ref)
    tol = float(min(np.median(np.quantile(err, 0.99, axis=1)), np.median(np.quantile(err, 0.99, axis=0))))
    ref_scores, ref_top = exact_topk(ref_q, ref_g, k)
    _, cand_top = exact_topk(cand_q, cand_g, k)
    kth = ref_scores[:, -1:]
    explained = np.take_along_axis(ref, cand_top, axis=1) >= kth - 2 * tol
    overlap = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ref_top.tolist(), cand_top.tolist())])
    return {"score_error": tol, "score_error_max": float(err.max()), "tie_aware": float(explained.mean()),
            "overlap": float(overlap), "ref_top": ref_top, "cand_top": cand_top}


def _batched(fn, items, batch_size, desc):
    out = [fn(items[i:i + batch_size]) for i in tqdm(range(0, len(items), batch_size), desc=desc, leave=False)]
    return np.concatenate(out).astype(np.float32)


def _cosine(a, b) -> float:
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))


def run_parity(model, bundle_dir: str, queries_path: str, tsv_path: str, *, settings: ParitySettings | None = None,
               limits: ParityLimits | None = None, device: str = "auto") -> dict:
    """Compare PyTorch and both ONNX precisions; return the report (raise nothing)."""
    settings, limits = settings or ParitySettings(), limits or ParityLimits()
    tsv = ImageTSV(tsv_path)
    texts, ids, scored = gate_subset(queries_path, tsv, settings)
    bs = settings.batch_size
    fp32 = BundleEncoders(bundle_dir, choice=RuntimeChoice(("CPUExecutionProvider",), False), batch_size=bs,
                          text_batch=bs)
    gpu = choose_runtime(device, "fp16")
    reduced = {"fp16": BundleEncoders(bundle_dir, choice=RuntimeChoice(gpu.providers, True), batch_size=bs,
                                      text_batch=bs)}
    if has_graphs(fp32.manifest, "int8"):
        reduced["int8"] = BundleEncoders(bundle_dir, choice=choose_runtime("cpu", "int8"), batch_size=bs,
                                         text_batch=bs)
    pixels = np.stack([resize_image(tsv.load(i), fp32.image_size, fp32.resize_rule) for i in ids])
    model = model.eval().float().cpu()

    @torch.no_grad()
    def torch_text(batch):
        a, m = fp32.tokenizer(batch)
        return model.encode_text(torch.from_numpy(a), torch.from_numpy(m)).numpy()

    @torch.no_grad()
    def torch_image(batch):
        return model.encode_image(torch.from_numpy(batch)).numpy()

    outputs = {}
    runs = [("torch", torch_text, torch_image), ("fp32", fp32.encode_text, fp32.encode_images)]
    runs += [(name, enc.encode_text, enc.encode_images) for name, enc in reduced.items()]
    for name, text_fn, image_fn in runs:
        outputs[name] = (_batched(text_fn, texts, bs, f"parity: {name} text"),
                         _batched(image_fn, pixels, bs, f"parity: {name} image"))
    report = {"queries": len(texts), "gallery_images": len(ids), "recall_queries": len(scored), "batch_size": bs,
              "fp16_device": gpu.device, "limits": asdict(limits)}
    failures, finite = [], {}
    for name, (t, i) in outputs.items():
        finite[name] = True
        for kind, feats, label in (("text", t, lambda r: f"query {r + 1} {texts[r]!r}"),
                                   ("image", i, lambda r: f"image {ids[r]}")):
            row = first_nonfinite_row(feats)
            if row is not None:
                finite[name] = False
                bad = int((~np.isfinite(feats).all(axis=1)).sum())
                failures.append(f"{name} {kind} embeddings not finite in {bad} of {len(feats)} rows "
                                f"(first: {label(row)})")
    (ref_t, ref_i), (o32_t, o32_i) = outputs["torch"], outputs["fp32"]
    if finite["torch"] and finite["fp32"]:  # every check whose inputs are finite still runs
        report.update(fp32_max_abs_text=float(np.abs(o32_t - ref_t).max()),
                      fp32_max_abs_image=float(np.abs(o32_i - ref_i).max()))
        for key in ("fp32_max_abs_text", "fp32_max_abs_image"):
            if not report[key] <= limits.fp32_max_abs:
                failures.append(f"{key} {report[key]:.3g} > {limits.fp32_max_abs:g}")
    for name in reduced:
        if finite["torch"] and finite[name]:
            failures += _reduced_precision_checks(name, report, limits, outputs["torch"], outputs[name], ids, scored)
    report["failures"] = failures
    report["passed"] = not failures
    return report


def _reduced_precision_checks(name: str, report: dict, limits: ParityLimits, ref, cand, ids, scored) -> list[str]:
    """Cosine, tie-aware ranking and subset recall of the `name` graphs (fp16 | int8) against
    PyTorch, with the `name_*` limits; adds the figures to `report` and returns the failures."""
    (ref_t, ref_i), (out_t, out_i) = ref, cand
    min_cosine, min_tie_aware, max_delta = (getattr(limits, f"{name}_{k}") for k in
                                            ("min_cosine", "min_tie_aware", "max_recall_delta"))
    rank = ranking_agreement(ref_t, ref_i, out_t, out_i)
    recall = {}
    for who, top in (("torch", rank["ref_top"]), (name, rank["cand_top"])):
        preds = {q.query_id: [ids[p] for p in top[row]] for row, q in scored.items()}
        recall[who] = score_predictions(list(scored.values()), preds).mean_recall if scored else None
    report.update({f"{name}_min_cosine_text": _cosine(out_t, ref_t), f"{name}_min_cosine_image": _cosine(out_i, ref_i),
                   f"{name}_score_error": rank["score_error"], f"{name}_score_error_max": rank["score_error_max"],
                   f"{name}_top10_tie_aware": rank["tie_aware"], f"{name}_top10_overlap": rank["overlap"],
                   "mean_recall_torch": recall["torch"], f"mean_recall_{name}": recall[name]})
    failures = []
    for key in (f"{name}_min_cosine_text", f"{name}_min_cosine_image"):
        if not report[key] >= min_cosine:
            failures.append(f"{key} {report[key]:.6f} < {min_cosine}")
    if not rank["tie_aware"] >= min_tie_aware:
        failures.append(f"{name}_top10_tie_aware {rank['tie_aware']:.4f} < {min_tie_aware}")
    if not scored:
        failures.append(f"no valid query has its positives among the gate's {len(ids)} images: recall cannot "
                        "be checked (raise --parity-gallery)")
        return failures
    delta = recall[name] - recall["torch"]
    tolerance = max(max_delta, 100.0 / len(scored))
    report.update({f"{name}_recall_delta": delta, f"{name}_recall_tolerance": tolerance})
    if abs(delta) > tolerance:
        failures.append(f"{name} MeanRecall {recall[name]:.2f} vs torch {recall['torch']:.2f} on "
                        f"{len(scored)} queries: |delta| {abs(delta):.2f} > {tolerance:.2f}")
    return failures


def format_report(report: dict) -> str:
    lim = report["limits"]
    lines = [f"parity on {report['queries']} valid queries x {report['gallery_images']} valid images "
             f"(batch {report['batch_size']}, fp16 on {report['fp16_device']}):"]
    if "fp32_max_abs_text" in report:
        lines.append(f"  fp32 vs torch max|diff|  text {report['fp32_max_abs_text']:.2e}  image "
                     f"{report['fp32_max_abs_image']:.2e}  (limit {lim['fp32_max_abs']:g})")
    for name in ("fp16", "int8"):
        if f"{name}_min_cosine_text" in report:
            lines += [f"  {name} vs torch min cosine text {report[f'{name}_min_cosine_text']:.6f}  image "
                      f"{report[f'{name}_min_cosine_image']:.6f}  (limit {lim[f'{name}_min_cosine']})",
                      f"  {name} top-10 ids explained by score error {100 * report[f'{name}_top10_tie_aware']:.2f}% "
                      f"(limit {100 * lim[f'{name}_min_tie_aware']:.0f}%; score error "
                      f"{report[f'{name}_score_error']:.2e}, max {report[f'{name}_score_error_max']:.2e}); raw top-10 "
                      f"overlap {100 * report[f'{name}_top10_overlap']:.2f}% (information)"]
        if f"{name}_recall_delta" in report:
            lines.append(f"  {name} vs torch MeanRecall on {report['recall_queries']} queries with their positives: "
                         f"{report[f'mean_recall_{name}']:.2f} vs {report['mean_recall_torch']:.2f} (delta "
                         f"{report[f'{name}_recall_delta']:+.2f}, tolerance {report[f'{name}_recall_tolerance']:.2f})")
    lines.append("  PASSED" if report["passed"] else "  FAILED: " + "; ".join(report["failures"]))
    return "\n".join(lines)
