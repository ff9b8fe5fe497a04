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
  gallery, within a tolerance of `ParityLimits.fp16.max_recall_delta` points, or one query's worth
  (100 / queries scored) when that is larger.
The figures are a `ParityReport`: one dataclass per precision (`Fp32Parity`, `ReducedParity`),
rendered for the log and serialised into the manifest in one place.
- int8 graphs (`muge export --int8`), when the bundle has them: the same cosine, ranking and
  recall checks against PyTorch, with the `int8` limits (int8 weights move scores more).
- Every output finite: a NaN or inf embedding fails the gate, naming the graph and the input.
The bundle is run through `predict.runtime`, i.e. exactly as `muge predict` will run it, one
graph at a time; the PyTorch reference is computed before (`torch_embeddings`), so an export can
free each torch tower once its graph is written.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from competition import ImageTSV, read_queries, score_predictions
from competition.topk import exact_topk, first_nonfinite_row
from predict.manifest import read_manifest
from predict.runtime import BundleEncoders, RuntimeChoice, choose_runtime, has_graphs

from .memory import free_memory

log = logging.getLogger(__name__)
REDUCED = ("fp16", "int8")  # the precisions checked by cosine, ranking and recall


@dataclass
class ReducedLimits:
    """What a reduced-precision graph (fp16, int8) must reach against PyTorch."""

    min_cosine: float
    min_tie_aware: float
    max_recall_delta: float  # MeanRecall points (x100) on the gate's subset


@dataclass
class ParityLimits:
    fp32_max_abs: float = 1e-4
    fp16: ReducedLimits = field(default_factory=lambda: ReducedLimits(0.999, 0.99, 1.0))
    int8: ReducedLimits = field(default_factory=lambda: ReducedLimits(0.98, 0.95, 2.0))


@dataclass
class ParitySettings:
    queries: int = 300
    gallery: int = 1000
    batch_size: int = 32


@dataclass
class Fp32Parity:
    max_abs_text: float
    max_abs_image: float


@dataclass
class ReducedParity:
    """fp16 or int8 graphs against PyTorch (module docstring)."""

    min_cosine_text: float
    min_cosine_image: float
    score_error: float
    score_error_max: float
    top10_tie_aware: float
    top10_overlap: float  # information only
    mean_recall_torch: float | None = None
    mean_recall: float | None = None
    recall_delta: float | None = None
    recall_tolerance: float | None = None


@dataclass
class ParityReport:
    queries: int
    gallery_images: int
    recall_queries: int
    batch_size: int
    fp16_device: str
    limits: ParityLimits
    fp32: Fp32Parity | None = None
    fp16: ReducedParity | None = None
    int8: ReducedParity | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        """The manifest's `parity` entry."""
        return {**asdict(self), "passed": self.passed}

    def render(self) -> str:
        lim = self.limits
        lines = [f"parity on {self.queries} valid queries x {self.gallery_images} valid images "
                 f"(batch {self.batch_size}, fp16 on {self.fp16_device}):"]
        if self.fp32 is not None:
            lines.append(f"  fp32 vs torch max|diff|  text {self.fp32.max_abs_text:.2e}  image "
                         f"{self.fp32.max_abs_image:.2e}  (limit {lim.fp32_max_abs:g})")
        for name in REDUCED:
            got, want = getattr(self, name), getattr(lim, name)
            if got is None:
                continue
            lines += [f"  {name} vs torch min cosine text {got.min_cosine_text:.6f}  image {got.min_cosine_image:.6f}  "
                      f"(limit {want.min_cosine})",
                      f"  {name} top-10 ids explained by score error {100 * got.top10_tie_aware:.2f}% (limit "
                      f"{100 * want.min_tie_aware:.0f}%; score error {got.score_error:.2e}, max "
                      f"{got.score_error_max:.2e}); raw top-10 overlap {100 * got.top10_overlap:.2f}% (information)"]
            if got.recall_delta is not None:
                lines.append(f"  {name} vs torch MeanRecall on {self.recall_queries} queries with their positives: "
                             f"{got.mean_recall:.2f} vs {got.mean_recall_torch:.2f} (delta {got.recall_delta:+.2f}, "
                             f"tolerance {got.recall_tolerance:.2f})")
        lines.append("  PASSED" if self.passed else "  FAILED: " + "; ".join(self.failures))
        return "\n".join(lines)


class ParityError(RuntimeError):
    def __init__(self, report: ParityReport):
        self.report = report
        super().__init__("parity gate failed: " + "; ".join(report.failures))


@dataclass
class GateInputs:
    """The gate's subset (module docstring): query texts, gallery ids and their pixels as predict
    feeds them, and {row in texts: query} of the queries scored for recall."""

    texts: list[str]
    ids: list[int]
    recall_queries: dict
    pixels: np.ndarray


def gate_inputs(queries_path: str, tsv_path: str, settings: ParitySettings, image_size: int,
                resize_rule: str) -> GateInputs:
    tsv = ImageTSV(tsv_path)
    queries = read_queries(queries_path)[:settings.queries]
    n_gallery = min(settings.gallery, len(tsv))
    chosen: dict[int, None] = {}  # insertion-ordered set
    recall_queries = {}
    for row, q in enumerate(queries):
        positives = [i for i in (q.item_ids or ()) if i in tsv]
        new = [i for i in positives if i not in chosen]
        if positives and len(chosen) + len(new) <= n_gallery // 2:
            chosen.update(dict.fromkeys(new))
            recall_queries[row] = q
    for img_id in tsv.ids.tolist():
        if len(chosen) >= n_gallery:
            break
        chosen.setdefault(img_id)
    ids = list(chosen)
    pixels = np.stack([tsv.load_pixels(i, image_size, resize_rule) for i in ids])
    return GateInputs([q.text for q in queries], ids, recall_queries, pixels)


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


@torch.no_grad()
def torch_embeddings(model, kind: str, inputs: GateInputs, tokenizer, batch_size: int) -> np.ndarray:
    """One tower of the PyTorch model (on the CPU, fp32) on the gate's inputs: the reference the
    graphs must match."""
    model.eval()
    if kind == "text":
        def encode(batch):
            ids, mask = tokenizer(batch)
            return model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        return _batched(encode, inputs.texts, batch_size, "parity: torch text")
    return _batched(lambda batch: model.encode_image(torch.from_numpy(batch)).numpy(), inputs.pixels, batch_size,
                    "parity: torch image")


def check_bundle(reference: dict, bundle_dir: str, inputs: GateInputs, *, settings: ParitySettings | None = None,
                 limits: ParityLimits | None = None, device: str = "auto") -> ParityReport:
    """Compare every precision of the bundle with the PyTorch `reference` ({text, image}
    embeddings of `inputs`); return the report (raise nothing). Each graph's session is opened
    alone and closed before the next: at ViT-H/14 one fp32 image session holds gigabytes."""
    settings, limits = settings or ParitySettings(), limits or ParityLimits()
    texts, ids, recall_queries = inputs.texts, inputs.ids, inputs.recall_queries
    bs = settings.batch_size
    fp16_runtime = choose_runtime(device, "fp16")
    choices = {"fp32": RuntimeChoice(("CPUExecutionProvider",), False),
               "fp16": RuntimeChoice(fp16_runtime.providers, True)}
    if has_graphs(read_manifest(bundle_dir), "int8"):
        choices["int8"] = choose_runtime("cpu", "int8")
    outputs = {"torch": (reference["text"], reference["image"])}
    for name, choice in choices.items():
        feats = []
        for kind in ("text", "image"):
            encoders = BundleEncoders(bundle_dir, choice=choice, batch_size=bs, text_batch=bs, towers=(kind,))
            encode, items = (encoders.encode_text, texts) if kind == "text" else (encoders.encode_images,
                                                                                   inputs.pixels)
            feats.append(_batched(encode, items, bs, f"parity: {name} {kind}"))
            del encoders, encode  # the session goes before the next opens
            free_memory()
        outputs[name] = tuple(feats)
    report = ParityReport(len(texts), len(ids), len(recall_queries), bs, fp16_runtime.device, limits)
    finite = {}
    for name, (text_feats, image_feats) in outputs.items():
        finite[name] = True
        for kind, feats, label in (("text", text_feats, lambda r: f"query {r + 1} {texts[r]!r}"),
                                   ("image", image_feats, lambda r: f"image {ids[r]}")):
            row = first_nonfinite_row(feats)
            if row is not None:
                finite[name] = False
                bad = int((~np.isfinite(feats).all(axis=1)).sum())
                report.failures.append(f"{name} {kind} embeddings not finite in {bad} of {len(feats)} rows "
                                       f"(first: {label(row)})")
    (ref_t, ref_i), (o32_t, o32_i) = outputs["torch"], outputs["fp32"]
    if finite["torch"] and finite["fp32"]:  # every check whose inputs are finite still runs
        report.fp32 = Fp32Parity(float(np.abs(o32_t - ref_t).max()), float(np.abs(o32_i - ref_i).max()))
        for kind, value in (("text", report.fp32.max_abs_text), ("image", report.fp32.max_abs_image)):
            if not value <= limits.fp32_max_abs:
                report.failures.append(f"fp32 {kind} max |diff| {value:.3g} > {limits.fp32_max_abs:g}")
    for name in choices:
        if name != "fp32" and finite["torch"] and finite[name]:
            result, failures = reduced_parity(name, getattr(limits, name), outputs["torch"], outputs[name], ids,
                                              recall_queries)
            setattr(report, name, result)
            report.failures += failures
    return report


def reduced_parity(name: str, limits: ReducedLimits, ref, cand, ids, recall_queries) -> tuple[ReducedParity, list[str]]:
    """Cosine, tie-aware ranking and subset recall of the `name` graphs (fp16 | int8) against
    PyTorch; returns the figures and the failures."""
    (ref_t, ref_i), (out_t, out_i) = ref, cand
    rank = ranking_agreement(ref_t, ref_i, out_t, out_i)
    recall = {}
    for who, top in (("torch", rank["ref_top"]), (name, rank["cand_top"])):
        preds = {q.query_id: [ids[p] for p in top[row]] for row, q in recall_queries.items()}
        recall[who] = score_predictions(list(recall_queries.values()), preds).mean_recall if recall_queries else None
    result = ReducedParity(_cosine(out_t, ref_t), _cosine(out_i, ref_i), rank["score_error"], rank["score_error_max"],
                           rank["tie_aware"], rank["overlap"], recall["torch"], recall[name])
    failures = []
    for kind, value in (("text", result.min_cosine_text), ("image", result.min_cosine_image)):
        if not value >= limits.min_cosine:
            failures.append(f"{name} {kind} min cosine {value:.6f} < {limits.min_cosine}")
    if not result.top10_tie_aware >= limits.min_tie_aware:
        failures.append(f"{name} top-10 explained by score error {result.top10_tie_aware:.4f} < {limits.min_tie_aware}")
    if not recall_queries:
        failures.append(f"no valid query has its positives among the gate's {len(ids)} images: recall cannot "
                        "be checked (raise --parity-gallery)")
        return result, failures
    result.recall_delta = recall[name] - recall["torch"]
    result.recall_tolerance = max(limits.max_recall_delta, 100.0 / len(recall_queries))
    if abs(result.recall_delta) > result.recall_tolerance:
        failures.append(f"{name} MeanRecall {recall[name]:.2f} vs torch {recall['torch']:.2f} on {len(recall_queries)} "
                        f"queries: |delta| {abs(result.recall_delta):.2f} > {result.recall_tolerance:.2f}")
    return result, failures
