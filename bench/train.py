"""`muge bench train`: training throughput, the bare step against the real loop.

(a) The bare step: forward, symmetric InfoNCE, backward and AdamW (`train_step`, as training
    runs it) on synthetic tensors held on the device: random pixels, random token ids with the
    real loader's padding and lengths. Eager, then compiled.
(b) The real loop: `train_one_epoch` over the config's data (read, decode, augment, collate,
    copy), compiled or not as the config says, over as many epochs as `--steps` needs.
loop/step is (b) over (a) in the loop's own mode: 1.0 means the data pipeline keeps up.

Also reported: peak GPU memory; model FLOPs per sample (forward + backward, counted by torch's
`FlopCounterMode` on the eager model) and model FLOPs utilisation on a GPU of `PEAK_TFLOPS`; the
data pipeline's rate on one core (a DataLoader worker's work), with our JPEG path against PIL
alone, and from it the workers that the measured step rate needs.
"""
from __future__ import annotations

import math
import os
import tempfile
import time

import click

from .table import FiniteFloatRange, emit, in_checkout, table_options

# Dense bf16/fp16 tensor-core peak in TFLOP/s, from the vendors' spec sheets (SXM parts where both
# exist); the longest name contained in torch.cuda.get_device_name() wins. TF32 is half of it.
PEAK_TFLOPS = {"H100": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.4, "B200": 2250.0,
               "A100": 312.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0, "V100": 125.0, "T4": 65.0}


def peak_tflops(device_name: str, precision: str) -> float | None:
    names = [n for n in PEAK_TFLOPS if n in device_name]
    if not names:
        return None
    peak = PEAK_TFLOPS[max(names, key=len)]
    return peak / 2 if precision == "fp32" else peak


def synthetic_batch(real: dict, vocab_size: int, device) -> dict:
    """Random pixels and token ids shaped like a real batch, with its attention mask (so the text
    tower does the same work), and distinct ids (no duplicate positives)."""
    import torch

    g = torch.Generator().manual_seed(0)
    n = len(real["pixels"])
    ids = torch.randint(1, vocab_size, real["input_ids"].shape, generator=g) * real["attention_mask"]
    batch = {"pixels": torch.randint(0, 256, real["pixels"].shape, dtype=torch.uint8, generator=g),
             "input_ids": ids, "attention_mask": real["attention_mask"].clone(),
             "image_ids": torch.arange(n), "query_ids": torch.arange(n)}
    return {k: v.to(device) for k, v in batch.items()}


def model_flops_per_sample(model, criterion, batch: dict, precision: str, device, rows: int = 2) -> float:
    """Forward + backward FLOPs of the model (the loss's B x B similarities excluded) per pair."""
    from torch.utils.flop_counter import FlopCounterMode

    from train.precision import autocast

    small = {k: v[:rows] for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        with autocast(precision, device):
            img, txt, scale = model(small["pixels"], small["input_ids"], small["attention_mask"])
        loss, _ = criterion(img, txt, scale, small["image_ids"], small["query_ids"])
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / rows


def time_steps(step, n: int, warmup: int, device) -> tuple[float, float]:
    """(seconds per step after `warmup` steps, the first step's seconds)."""
    from train.speed import synchronize

    start = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / n, first


def pipeline_per_worker(dataset, collate, n: int) -> dict:
    """One core's rates (a DataLoader worker's): decode alone, ours and PIL's, and the whole
    sample path (read, decode, augment, tokenize, collate)."""
    import torch

    from competition.images import decode_image, decode_image_pil

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `data._worker_init` does in every worker
    try:
        keys = [(0, i) for i in range(min(n, len(dataset)))]
        blobs = [dataset.tsv.read_bytes(int(dataset.image_ids[i])) for _, i in keys]
        rates = {}
        for name, decode in (("decode_ms", decode_image), ("decode_pil_ms", decode_image_pil)):
            start = time.perf_counter()
            for b in blobs:
                decode(b)
            rates[name] = (time.perf_counter() - start) / len(blobs) * 1e3
        start = time.perf_counter()
        collate([dataset[k] for k in keys])
        rates["sample_ms"] = (time.perf_counter() - start) / len(keys) * 1e3
    finally:
        torch.set_num_threads(threads)
    return rates


def mask_ratio_rows(training, step, ratios, steps: int, warmup: int, device, bs: int) -> list[dict]:
    """The eager bare step at each FLIP mask ratio (highest first), with the samples/s against
    the unmasked step's and the peak resident set so far (on a GPU, the peak memory of each)."""
    import resource

    import torch

    rows, rates = [], {}
    for ratio in ratios:
        training.model.set_mask_ratio(ratio)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, _ = time_steps(step, steps, warmup, device)
        rates[ratio] = bs / seconds
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        rows.append({"what": f"bare step, eager, FLIP mask {ratio:g}", "mask_ratio": ratio,
                     "samples_per_s": round(rates[ratio], 1),
                     ("peak_mem_gib" if device.type == "cuda" else "peak_rss_gib"): round(peak, 2)})
    if 0.0 in rates:
        for row in rows:
            row["of_unmasked"] = round(rates[row["mask_ratio"]] / rates[0.0], 2)
    return rows


def lora_row(cfg, data_dir: str, synth: dict, steps: int, warmup: int, eager_s: float) -> dict:
    """The eager bare step of `cfg` (the bench's config with LoRA adapters of `train.lora.rank`)
    on the same batch, against the full fine-tune's step."""
    from competition.layout import split_files
    from train.data import stop_workers
    from train.main import build_training
    from train.step import train_step

    rank = cfg.train.lora.rank
    with tempfile.TemporaryDirectory() as tmp:
        training = build_training(cfg, split_files(data_dir, "train"), tmp, total_steps=10**9, defer_compile=True)
        parts = training.step_parts()
        seconds, _ = time_steps(lambda: train_step(parts, training.model, synth), steps, warmup, training.device)
        trained = sum(p.numel() for p in training.model.parameters() if p.requires_grad)
        stop_workers(training.loader)
    return {"what": f"bare step, eager, LoRA rank {rank} ({trained / 1e6:.2f}M trained)",
            "samples_per_s": round(cfg.train.batch_size / seconds, 1), "of_full": round(eager_s / seconds, 2)}


@click.command("train")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "data_dir", **in_checkout("data/sample"),
              type=click.Path(exists=True, file_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key.")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed steps, for the bare step and the loop each.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Untimed steps first (compile, autotuning).")
@click.option("--compiled/--no-compiled", default=True, show_default=True,
              help="Also time the compiled bare step (compiling takes a minute or more).")
@click.option("--mask-ratio", "mask_ratios", multiple=True, type=FiniteFloatRange(0, 1, max_open=True),
              help="Also time the eager bare step at these FLIP mask ratios (train.mask_ratio), each with the peak "
                   "RSS so far: run from the highest ratio (least memory) down.")
@click.option("--lora", "lora_ranks", multiple=True, type=click.IntRange(min=1), metavar="RANK",
              help="Also time the eager bare step with LoRA adapters of this rank (train.lora.rank), beside the full "
                   "fine-tune's; repeat it for more ranks (each timed once).")
@table_options
def bench_train(config_path, data_dir, overrides, steps, warmup, compiled, mask_ratios, lora_ranks, json_out,
                csv_out):
    """Training samples/s: the bare step (eager, compiled) against the real loop on the data."""
    import torch

    from competition.layout import split_files
    from train.config import ConfigError, load_config
    from train.data import Collate, stop_workers
    from train.loop import train_one_epoch
    from train.main import build_training, check_lora
    from train.speed import compile_model
    from train.step import train_step

    try:
        cfg = load_config(config_path, list(overrides))
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--config/--set") from None
    lora_ranks = tuple(dict.fromkeys(lora_ranks))  # each once, in the order given
    if lora_ranks and cfg.train.lora.rank:
        raise click.BadParameter(f"the config already trains LoRA (train.lora.rank={cfg.train.lora.rank}): --lora "
                                 "times it beside a full fine-tune; leave train.lora.rank at 0", param_hint="--lora")
    try:
        lora_cfgs = {rank: load_config(config_path, [*overrides, f"train.lora.rank={rank}"]) for rank in lora_ranks}
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--lora/--set") from None
    try:  # each ratio is a train.mask_ratio: checked as the config checks it (a CNN tower has no patches)
        for ratio in mask_ratios:
            load_config(config_path, [*overrides, f"train.mask_ratio={ratio}"])
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--mask-ratio") from None
    with tempfile.TemporaryDirectory() as tmp:
        training = build_training(cfg, split_files(data_dir, "train"), tmp, total_steps=10**9, defer_compile=True)
        try:  # every LoRA row's targets against this model, before anything is timed
            for lora_cfg in lora_cfgs.values():
                check_lora(lora_cfg, training.model)
        except ConfigError as exc:
            stop_workers(training.loader)
            raise click.BadParameter(str(exc), param_hint="--lora/--set") from None
        device, bs = training.device, cfg.train.batch_size
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
        pad_to = cfg.data.max_text_length if training.compiled else None
        collate = Collate(training.tokenizer, pad_to)
        real = collate([training.dataset[(0, i)] for i in range(bs)])
        synth = synthetic_batch(real, training.tokenizer.vocab_size, device)
        parts = training.step_parts()
        flops = model_flops_per_sample(training.model, training.criterion, synth, training.precision, device)
        title = (f"muge bench train: {config_path} on {name}, {training.precision}, batch {bs}, "
                 f"{cfg.data.image_size} px, "
                 f"text padded to {pad_to or 'the batch longest'}; "
                 f"{sum(p.numel() for p in training.model.parameters()) / 1e6:.1f}M parameters")

        def step():
            train_step(parts, training.model, synth)

        rows = []
        if mask_ratios:
            rows += mask_ratio_rows(training, step, sorted(set(mask_ratios), reverse=True), steps, warmup, device, bs)
        training.model.set_mask_ratio(cfg.train.mask_ratio)
        eager_s, _ = time_steps(step, steps, warmup, device)
        rows.append({"what": "bare step, eager", "mask_ratio": cfg.train.mask_ratio,
                     "samples_per_s": round(bs / eager_s, 1)})
        for lora_cfg in lora_cfgs.values():
            rows.append(lora_row(lora_cfg, data_dir, synth, steps, warmup, eager_s))
        compiled_s = compile_s = None

        def time_compiled():
            nonlocal compiled_s, compile_s
            compile_model(training.model)
            compiled_s, compile_s = time_steps(step, steps, warmup, device)
            rows.append({"what": "bare step, compiled", "samples_per_s": round(bs / compiled_s, 1),
                         "of_eager": round(eager_s / compiled_s, 2), "first_step_s": round(compile_s, 1)})

        if training.compiled:  # the loop runs the model as the config says: compiled first, or compiled after
            time_compiled()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        samples = seconds = 0.0
        epoch, left = 0, steps + warmup
        while left > 0:
            training.loader.sampler.set_epoch(epoch)
            stats = train_one_epoch(training, training.model, epoch, 0, max_batches=left,
                                    warmup=warmup if epoch == 0 else 0)
            samples, seconds = samples + stats.steady_samples, seconds + stats.steady_s
            left, epoch = left - min(left, len(training.loader)), epoch + 1
        stop_workers(training.loader)
        loop = samples / max(seconds, 1e-9)
        loop_step_s = compiled_s if training.compiled else eager_s
        ratio = loop / (bs / loop_step_s)
        rows.append({"what": f"real loop, {'compiled' if training.compiled else 'eager'} ({epoch} epoch(s) of "
                             f"{len(training.loader)} batches, data.workers={cfg.data.workers})",
                     "samples_per_s": round(loop, 1), "of_its_bare_step": round(ratio, 2)})
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        peak = peak_tflops(name, training.precision) if device.type == "cuda" else None
        mfu = loop * flops / (peak * 1e12) if peak else None
        if compiled and not training.compiled:
            time_compiled()
        pipe = pipeline_per_worker(training.dataset, collate, min(256, len(training.dataset)))
        per_worker = 1e3 / pipe["sample_ms"]
        step_rate = bs / loop_step_s  # the step the loop runs
        needed = math.ceil(step_rate / per_worker)
        rows.append({"what": "data, one core (a worker)", "samples_per_s": round(per_worker, 1)})
    emit(rows, title=title, json_out=json_out, csv_out=csv_out,
         extra={"config": config_path, "device": name, "precision": training.precision, "batch_size": bs,
                "image_size": cfg.data.image_size, "text_length": int(synth["input_ids"].shape[1]),
                "step_samples_per_s": bs / eager_s,
                "step_compiled_samples_per_s": bs / compiled_s if compiled_s else None,
                "compile_s": compile_s, "loop_compiled": training.compiled, "loop_samples_per_s": loop,
                "loop_step_ratio": ratio, "peak_mem_gib": peak_mem, "flops_per_sample": flops, "mfu": mfu,
                "workers": cfg.data.workers, **pipe, "workers_needed": needed},
         notes=[f"model: {flops / 1e9:,.2f} GFLOP per pair (forward + backward); MFU "
                + (f"{mfu:.1%} of {peak:,.0f} TFLOP/s" if mfu is not None else f"n/a on {name}")
                + (f"; peak memory {peak_mem:.1f} GiB" if peak_mem is not None else ""),
                f"data, one core: decode {pipe['decode_ms']:.2f} ms/image (PIL alone {pipe['decode_pil_ms']:.2f}, "
                f"x{pipe['decode_pil_ms'] / pipe['decode_ms']:.2f}); a whole sample {pipe['sample_ms']:.2f} ms",
                f"the {step_rate:,.0f} samples/s step needs {needed} worker(s) (data.workers={cfg.data.workers})"])
