"""The parity gate: the bundle must reproduce the PyTorch model on real valid-split inputs.

fp32 ONNX vs PyTorch: max |diff| <= 1e-4 on text and image embeddings.
fp16 ONNX vs PyTorch: per-row cosine >= 0.999.
Ranking: top-10 lists of valid queries against (a slice of) the valid gallery, fp16 ONNX vs
PyTorch, share >= 95% of ids. The bundle is run through `predict.runtime`, i.e. exactly as
`muge predict` will run it.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from competition import ImageTSV, read_queries, resize_image
from competition.topk import exact_topk
from predict.runtime import BundleEncoders, RuntimeChoice, choose_runtime

log = logging.getLogger(__name__)


@dataclass
class ParityLimits:
    fp32_max_abs: float = 1e-4
    fp16_min_cosine: float = 0.999
    fp16_min_top10_overlap: float = 0.95


@dataclass
class ParitySettings:
    queries: int = 300
    gallery: int = 1000
    batch_size: int = 32


class ParityError(RuntimeError):
    def __init__(self, report: dict):
        self.report = report
        super().__init__("parity gate failed: " + "; ".join(report["failures"]))


def _batched(fn, items, batch_size, desc):
    out = [fn(items[i:i + batch_size]) for i in tqdm(range(0, len(items), batch_size), desc=desc, leave=False)]
    return np.concatenate(out).astype(np.float32)


def run_parity(model, bundle_dir: str, queries_path: str, tsv_path: str, settings: ParitySettings = ParitySettings(),
               limits: ParityLimits = ParityLimits(), device: str = "auto") -> dict:
    """Compare PyTorch and both ONNX precisions; return the report (raise nothing)."""
    texts = [q.text for q in read_queries(queries_path)][:settings.queries]
    tsv = ImageTSV(tsv_path)
    fp32 = BundleEncoders(bundle_dir, choice=RuntimeChoice(("CPUExecutionProvider",), False))
    gpu = choose_runtime(device, "fp16")
    fp16 = BundleEncoders(bundle_dir, choice=RuntimeChoice(gpu.providers, True))
    ids = tsv.ids[:settings.gallery].tolist()
    pixels = np.stack([resize_image(tsv.load(i), fp32.image_size, fp32.resize_rule) for i in ids])
    bs = settings.batch_size
    model = model.eval().float().cpu()

    @torch.no_grad()
    def torch_text(batch):
        a, m = fp32.tokenizer(batch)
        return model.encode_text(torch.from_numpy(a), torch.from_numpy(m)).numpy()

    @torch.no_grad()
    def torch_image(batch):
        return model.encode_image(torch.from_numpy(batch)).numpy()

    ref_t, ref_i = _batched(torch_text, texts, bs, "parity: torch text"), _batched(torch_image, pixels, bs, "parity: torch image")
    o32_t, o32_i = _batched(fp32.encode_text, texts, bs, "parity: fp32 text"), _batched(fp32.encode_images, pixels, bs, "parity: fp32 image")
    o16_t, o16_i = _batched(fp16.encode_text, texts, bs, "parity: fp16 text"), _batched(fp16.encode_images, pixels, bs, "parity: fp16 image")

    def cos(a, b):
        return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))

    _, ref_top = exact_topk(ref_t, ref_i, k=10)
    _, o16_top = exact_topk(o16_t, o16_i, k=10)
    overlap = float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ref_top.tolist(), o16_top.tolist())]))
    report = {
        "queries": len(texts), "gallery_images": len(ids), "batch_size": bs, "fp16_device": gpu.device,
        "fp32_max_abs_text": float(np.abs(o32_t - ref_t).max()), "fp32_max_abs_image": float(np.abs(o32_i - ref_i).max()),
        "fp16_min_cosine_text": cos(o16_t, ref_t), "fp16_min_cosine_image": cos(o16_i, ref_i),
        "fp16_top10_overlap": overlap, "limits": asdict(limits),
    }
    failures = []
    for key in ("fp32_max_abs_text", "fp32_max_abs_image"):
        if not report[key] <= limits.fp32_max_abs:
            failures.append(f"{key} {report[key]:.3g} > {limits.fp32_max_abs:g}")
    for key in ("fp16_min_cosine_text", "fp16_min_cosine_image"):
        if not report[key] >= limits.fp16_min_cosine:
            failures.append(f"{key} {report[key]:.6f} < {limits.fp16_min_cosine}")
    if not overlap >= limits.fp16_min_top10_overlap:
        failures.append(f"fp16_top10_overlap {overlap:.4f} < {limits.fp16_min_top10_overlap}")
    report["failures"] = failures
    report["passed"] = not failures
    return report


def format_report(report: dict) -> str:
    return (f"parity on {report['queries']} valid queries x {report['gallery_images']} valid images "
            f"(batch {report['batch_size']}, fp16 on {report['fp16_device']}):\n"
            f"  fp32 vs torch max|diff|  text {report['fp32_max_abs_text']:.2e}  image {report['fp32_max_abs_image']:.2e}"
            f"  (limit {report['limits']['fp32_max_abs']:g})\n"
            f"  fp16 vs torch min cosine text {report['fp16_min_cosine_text']:.6f}  image "
            f"{report['fp16_min_cosine_image']:.6f}  (limit {report['limits']['fp16_min_cosine']})\n"
            f"  fp16 vs torch top-10 overlap {100 * report['fp16_top10_overlap']:.2f}%  "
            f"(limit {100 * report['limits']['fp16_min_top10_overlap']:.0f}%)\n"
            f"  {'PASSED' if report['passed'] else 'FAILED: ' + '; '.join(report['failures'])}")
