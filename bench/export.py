"""`muge bench export`: the graphs `predict` runs on a CPU against PyTorch eager, for the text and
image encoders of each named preset: ORT fp32 as the bundle ships it (transformer towers fused,
`export.optimize`) and, with `--int8`, the int8 graphs of `muge export --int8`.

Models are built from the presets with random weights (no hub access needed): the speed of an
encoder does not depend on its weight values. A text tower named by hub id is replaced by a
random `BertConfig` of the same default size (bert-base: 12 layers, 768 wide, vocab 21128), and
the Chinese-CLIP preset by ViT-B/16 + RoBERTa-base shapes. `--json OUT` keeps one row per
(model, encoder, batch).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import replace
from functools import partial

import click
import numpy as np

from .shapes import BERT_CHINESE_VOCAB, VIT_B16_CLIP
from .table import FiniteFloatRange, emit, in_checkout, table_options

PRESETS = in_checkout(*(f"configs/{name}.yaml" for name in ("sample", "bert-convnext", "cnclip-vit-b16")))


def _random_model(preset: str):
    """(model in eval mode, image size, max text length, vocab size) for a preset, random weights."""
    import yaml

    from model.config import read_sections
    from model.factory import create_model

    with open(preset, encoding="utf-8") as f:
        cfg, data = read_sections(yaml.safe_load(f), preset)
    if cfg.name and not cfg.config:  # published weights named, their shape not given: B/16's
        cfg = replace(cfg, config=VIT_B16_CLIP)
    cfg = replace(cfg, name=None, text=replace(cfg.text, name=None), image=replace(cfg.image, pretrained=False))
    vocab = BERT_CHINESE_VOCAB if not cfg.text.config else 1000
    model, _ = create_model(cfg, vocab_size=vocab)
    return model.eval(), data.image_size, data.max_text_length, vocab


def _time(fn, min_runs: int, budget_s: float) -> float:
    """Median seconds per call after one warm-up call: at least `min_runs` runs, more while the
    budget lasts."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _inputs(kind: str, batch: int, size: int, seq: int, vocab: int, rng) -> dict:
    if kind == "text":
        ids = rng.integers(5, vocab, (batch, seq), dtype=np.int64)
        mask = np.ones((batch, seq), dtype=np.int64)
        lengths = rng.integers(seq // 3, seq + 1, batch)  # real queries are padded to the longest
        mask[np.arange(seq)[None, :] >= lengths[:, None]] = 0
        return {"input_ids": ids, "attention_mask": mask}
    return {"pixels": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)}


def bench_preset(preset: str, batches: tuple[int, ...], min_runs: int, budget_s: float, echo,
                 threads: int | None = None, int8: bool = False) -> list[dict]:
    import torch

    from export.optimize import attention_nodes, export_tower, prepare_fusion, to_int8
    from predict.runtime import RuntimeChoice, session

    model, size, seq, vocab = _random_model(preset)
    plans = prepare_fusion(model)  # the graphs as `muge export` builds them
    name = os.path.splitext(os.path.basename(preset))[0]
    rng = np.random.default_rng(0)
    cpu = RuntimeChoice(("CPUExecutionProvider",), False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("text", "image"):
            example = tuple(torch.from_numpy(v) for v in _inputs(kind, 2, size, seq, vocab, rng).values())
            start = time.perf_counter()
            path = os.path.join(tmp, f"{kind}.onnx")
            attention = attention_nodes(export_tower(model, kind, path, example, plans[kind])[1])
            quantized = to_int8(path, os.path.join(tmp, f"{kind}.int8.onnx")) if int8 else None
            mib = os.path.getsize(path) / 2**20
            echo(f"  {name}/{kind}: exported in {time.perf_counter() - start:.0f}s ({mib:.0f} MiB), {attention} fused "
                 "attention nodes")
            sessions = {"fp32": session(path, cpu, threads)}
            if quantized:
                sessions["int8"] = session(quantized, cpu, threads)
            encode = model.encode_text if kind == "text" else model.encode_image
            for batch in batches:
                feeds = _inputs(kind, batch, size, seq, vocab, rng)
                tensors = [torch.from_numpy(v) for v in feeds.values()]
                with torch.inference_mode():
                    ref = encode(*tensors).numpy()
                    t_torch = _time(partial(encode, *tensors), min_runs, budget_s)
                ms, diff = {}, {}
                for precision, sess in sessions.items():
                    got = sess.run(None, feeds)[0]
                    ms[precision] = 1e3 * _time(partial(sess.run, None, feeds), min_runs, budget_s)
                    diff[precision] = float(np.abs(ref - got).max())
                row = {"model": name, "encoder": kind, "batch": batch, "torch_ms": 1e3 * t_torch,
                       "ort_fp32_ms": ms["fp32"], "ort_int8_ms": ms.get("int8"),
                       "speedup_fp32": 1e3 * t_torch / ms["fp32"],
                       "speedup_int8": 1e3 * t_torch / ms["int8"] if "int8" in ms else None,
                       "fused_attention_nodes": attention, "max_abs_diff_fp32": diff["fp32"],
                       "max_abs_diff_int8": diff.get("int8")}
                rows.append(row)
                int8_cell = (f"  int8 {row['ort_int8_ms']:8.1f} ms x{row['speedup_int8']:.2f}"
                             if row["ort_int8_ms"] is not None else "")
                echo(f"  {name:>14} {kind:>5} batch {batch:>2}: torch {row['torch_ms']:8.1f} ms  ORT fp32 "
                     f"{row['ort_fp32_ms']:8.1f} ms x{row['speedup_fp32']:.2f}{int8_cell}  (fp32 max |diff| "
                     f"{row['max_abs_diff_fp32']:.1e})")
    return rows


@click.command("export")
@click.option("--preset", "presets", multiple=True, type=click.Path(exists=True, dir_okay=False), **PRESETS,
              help="Config presets to build (random weights).")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1), default=(1, 8, 32), show_default=True)
@click.option("--min-runs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed runs per case (median reported).")
@click.option("--budget", type=FiniteFloatRange(min=0), default=2.0, show_default=True,
              help="Seconds per case to keep repeating within.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch and ORT intra-op threads (default: all cores).")
@click.option("--int8/--no-int8", default=True, show_default=True, help="Also time the int8 graphs.")
@table_options
def bench_export(presets, batches, min_runs, budget, threads, int8, json_out, csv_out):
    """Encoders on CPU: ONNX Runtime fp32 (fused) and int8 (ours) vs PyTorch eager, batch 1/8/32."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    click.echo(f"encoders on CPU ({os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads): PyTorch eager vs ONNX Runtime, median of >= {min_runs} runs")
    rows = []
    for preset in presets:
        rows += bench_preset(preset, tuple(batches), min_runs, budget, click.echo, threads, int8)
    emit([{k: (round(v, 3) if isinstance(v, float) and not k.startswith("max_abs") else v) for k, v in r.items()}
          for r in rows],
         title="muge bench export: ms per batch, PyTorch eager vs ORT fp32 as shipped (fused) and int8; speedup = "
               "torch time / ORT time", json_out=json_out, csv_out=csv_out)
