"""`muge bench export`: ONNX Runtime (fp32, the graphs `predict` runs on CPU) vs PyTorch eager,
both on this machine's CPU, for the text and image encoders of each named preset.

Models are built from the presets with random weights (no hub access needed): the speed of an
encoder does not depend on its weight values. A text tower named by hub id is replaced by a
random `BertConfig` of the same default size (bert-base: 12 layers, 768 wide, vocab 21128).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from functools import partial

import click
import numpy as np

PRESETS = ("configs/sample.yaml", "configs/bert-convnext.yaml")
BERT_CHINESE_VOCAB = 21128


def _random_model(preset: str):
    """(model in eval mode, image size, max text length, vocab size) for a preset, random weights."""
    from train.model import create_model
    from train.params import load_config

    cfg = load_config(preset, ["model.image.pretrained=false", "model.text.name=null", "model.name=null"])
    vocab = BERT_CHINESE_VOCAB if cfg.model.family == "dual" and not cfg.model.text.config else 1000
    model, _ = create_model(cfg.model, vocab_size=vocab)
    return model.eval(), cfg.data.image_size, cfg.data.max_text_length, vocab


def _time(fn, min_runs: int, budget_s: float) -> float:
    """Median seconds per call after one warm-up call: at least `min_runs` runs, more while the
    budget lasts."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 50):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
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
                 threads: int | None = None) -> list[dict]:
    import torch

    from predict.runtime import RuntimeChoice, session

    from .graphs import export_graph

    model, size, seq, vocab = _random_model(preset)
    name = os.path.splitext(os.path.basename(preset))[0]
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("text", "image"):
            example = tuple(torch.from_numpy(v) for v in _inputs(kind, 2, size, seq, vocab, rng).values())
            t = time.perf_counter()
            path = export_graph(model, kind, os.path.join(tmp, f"{kind}.onnx"), example)
            echo(f"  {name}/{kind}: exported in {time.perf_counter() - t:.0f}s "
                 f"({os.path.getsize(path) / 2**20:.0f} MiB)")
            sess = session(path, RuntimeChoice(("CPUExecutionProvider",), False), threads)
            encode = model.encode_text if kind == "text" else model.encode_image
            for batch in batches:
                feeds = _inputs(kind, batch, size, seq, vocab, rng)
                tensors = [torch.from_numpy(v) for v in feeds.values()]
                with torch.inference_mode():
                    ref = encode(*tensors).numpy()
                    t_torch = _time(partial(encode, *tensors), min_runs, budget_s)
                got = sess.run(None, feeds)[0]
                t_ort = _time(partial(sess.run, None, feeds), min_runs, budget_s)
                row = {"model": name, "encoder": kind, "batch": batch, "torch_ms": 1e3 * t_torch,
                       "ort_ms": 1e3 * t_ort, "speedup": t_torch / t_ort,
                       "max_abs_diff": float(np.abs(ref - got).max())}
                rows.append(row)
                echo(f"  {name:>12} {kind:>5} batch {batch:>2}: torch {row['torch_ms']:8.1f} ms  "
                     f"ORT {row['ort_ms']:8.1f} ms  x{row['speedup']:.2f}  (max |diff| {row['max_abs_diff']:.1e})")
    return rows


@click.command("export")
@click.option("--preset", "presets", multiple=True, default=PRESETS, show_default=True,
              help="Config presets to build (random weights).")
@click.option("--batch", "batches", multiple=True, type=int, default=(1, 8, 32), show_default=True)
@click.option("--min-runs", default=3, show_default=True, help="Timed runs per case (median reported).")
@click.option("--budget", default=2.0, show_default=True, help="Seconds per case to keep repeating within.")
@click.option("--threads", type=int, default=None, help="torch and ORT intra-op threads (default: all cores).")
def bench_export(presets, batches, min_runs, budget, threads):
    """Encoders on CPU: ONNX Runtime fp32 (ours) vs PyTorch eager, batch 1/8/32."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    click.echo(f"encoders on CPU ({os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads): PyTorch eager vs ONNX Runtime fp32, median of >= {min_runs} runs")
    rows = []
    for preset in presets:
        rows += bench_preset(preset, tuple(batches), min_runs, budget, click.echo, threads)
    click.echo("speed-up (torch time / ORT time):")
    for model in dict.fromkeys(r["model"] for r in rows):
        for kind in ("text", "image"):
            cells = "  ".join(f"b{r['batch']} x{r['speedup']:.2f}" for r in rows
                              if r["model"] == model and r["encoder"] == kind)
            click.echo(f"  {model:>12} {kind:>5}: {cells}")
