"""The training loop: `run(cfg, data_dir, out_dir)` fine-tunes, evaluates on valid every epoch,
and keeps `best.pt` (by MeanRecall), `last.pt` (resumable), `metrics.jsonl`, `curves.png` and
`config.yaml` in the run directory. Launch under torchrun for DDP."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from competition.io import atomic_write_text
from competition.layout import split_files

from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import PairDataset, train_loader
from .distributed import World, barrier, cleanup, device_for, init_distributed
from .ema import ModelEma
from .evaluate import check_gallery, evaluate
from .loss import ClipLoss
from .model import FAMILIES, create_model
from .optim import apply_freeze, create_optimizer
from .params import Config, TrainConfig, data_seed, save_config, to_dict
from .precision import grad_scaler, resolve_precision
from .scheduler import create_scheduler
from .speed import compile_enabled, configure_backends, match_param_layout, optimize_model, synchronize
from .step import forward_backward
from .tokenizer import prepare_tokenizer

log = logging.getLogger(__name__)
RESUME_KEYS = {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "history", "best"}


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def plot_curves(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    trained = [h for h in history if h.get("train_loss") is not None]
    a.plot([h["epoch"] for h in trained], [h["train_loss"] for h in trained], "o-")
    a.set(title="train loss", xlabel="epoch")
    for key in ("r1", "r5", "r10", "mean_recall"):
        b.plot(epochs, [h.get(key) for h in history], "o-", label=key)
    if any("ema" in h for h in history):
        b.plot(epochs, [h.get("ema", {}).get("mean_recall") for h in history], "s--", label="mean_recall (EMA)")
    b.set(title="valid recall (x100)", xlabel="epoch")
    b.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass
class EpochStats:
    loss: float
    step: int
    samples_s: float          # the whole epoch, start-up included
    steady_samples: int       # samples after the first `warmup` batches (compile, cuDNN autotuning, workers' start)
    steady_seconds: float
    first_batch_s: float      # the first batch's wall time: a compiled model's one-time compile shows here

    @property
    def steady_samples_s(self) -> float:
        return self.steady_samples / max(self.steady_seconds, 1e-9)


def train_step(model, criterion, batch: dict, optimizer, scheduler, scaler, t: TrainConfig, *, precision, device,
               group: int = 1, boundary: bool = True) -> torch.Tensor:
    """Forward and backward one batch (as 1/`group` of an accumulation group) and, at a group's
    `boundary`, clip, step and clamp. Returns the detached loss, on the device: no host sync."""
    skip_sync = not boundary and isinstance(model, DistributedDataParallel)
    with model.no_sync() if skip_sync else contextlib.nullcontext():
        loss = forward_backward(model, criterion, batch, precision=precision, device=device, scaler=scaler,
                                scale=1.0 / group, chunk=t.grad_cache_chunk)
    if boundary:
        if t.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], t.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        _unwrap(model).clamp_logit_scale()
    return loss


def train_one_epoch(model, criterion, loader, optimizer, scheduler, scaler, cfg: Config, precision, device,
                    world: World, epoch: int, step: int, *, max_batches: int | None = None,
                    warmup: int = 3, ema: ModelEma | None = None) -> EpochStats:
    """One pass over `loader` (or its first `max_batches`), updating `ema` after each optimizer
    step. The host waits for the device only at log intervals and at the `warmup` mark."""
    t = cfg.train
    model.train()
    n = len(loader) if max_batches is None else min(max_batches, len(loader))
    total, count, seen = torch.zeros((), device=device), 0, 0
    warmup = max(0, min(warmup, n - 1))
    t0 = time.perf_counter()
    first_batch_s, steady = 0.0, (t0, 0)
    bar = tqdm(loader, total=n, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not world.main, leave=False)
    for i, batch in enumerate(bar):
        if i == warmup:
            synchronize(device)
            steady = (time.perf_counter(), seen)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        # the epoch's last group may be short: it is stepped too (its gradients must not leak into
        # the next epoch, and last.pt holds none), averaged over its own length
        group = min(t.accum_steps, n - (i - i % t.accum_steps))
        boundary = (i + 1) % t.accum_steps == 0 or i == n - 1
        total += train_step(model, criterion, batch, optimizer, scheduler, scaler, t, precision=precision,
                            device=device, group=group, boundary=boundary)
        step += boundary
        if boundary and ema is not None:
            ema.update(_unwrap(model))
        count += 1
        seen += len(batch["pixels"]) * world.size
        if i == 0:
            synchronize(device)
            first_batch_s = time.perf_counter() - t0
        if world.main and (i % t.log_every == 0 or i == n - 1):
            scale = _unwrap(model).logit_scale.exp().item()
            bar.set_postfix(loss=f"{total.item() / count:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            temp=f"{1 / scale:.4f}", samples_s=f"{seen / (time.perf_counter() - t0):.1f}",
                            refresh=False)
        if i + 1 == n:  # `max_batches`: stop without fetching another batch
            break
    synchronize(device)
    end = time.perf_counter()
    stats = EpochStats(loss=total.item() / max(count, 1), step=step, samples_s=seen / max(end - t0, 1e-9),
                       steady_samples=seen - steady[1], steady_seconds=end - steady[0], first_batch_s=first_batch_s)
    if world.main:
        log.info("epoch %d: loss %.4f, %.1f samples/s (%.1f after its first %d batches; the first took %.1fs)",
                 epoch + 1, stats.loss, stats.samples_s, stats.steady_samples_s, warmup, first_batch_s)
    return stats


def _best_candidate(record: dict) -> dict:
    """An epoch's record as a best.pt candidate: the trained weights' scores, or the EMA's where
    they are higher (then `weights: ema`, and best.pt holds the EMA)."""
    averaged = record.get("ema")
    if averaged and averaged["mean_recall"] > record.get("mean_recall", -1):
        return {**{k: v for k, v in record.items() if k != "ema"}, **averaged, "weights": "ema"}
    return record


def wrap_ddp(model, world: World, device):
    """DDP over the parameters that train now: build it again whenever freezing changes them (a
    DDP reducer only ever syncs the parameters that required grad when it was built)."""
    if world.size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=False)


def run(cfg: Config, data_dir: str, out_dir: str, resume: bool = False) -> dict:
    """Train per `cfg`; returns the best epoch's metrics. A run directory this call created is
    removed again if training fails before its first checkpoint: a bad input leaves nothing behind."""
    world = init_distributed()
    created = not os.path.exists(out_dir)
    try:
        return _run(cfg, data_dir, out_dir, resume, world)
    except BaseException:
        if world.main and created and not os.path.exists(os.path.join(out_dir, "last.pt")):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        cleanup()


def _run(cfg, data_dir, out_dir, resume, world: World) -> dict:
    device = device_for(world)
    precision = resolve_precision(cfg.train.precision, device)
    compiled = compile_enabled(cfg.train.compile, device)
    configure_backends(device)
    seed_everything(cfg.train.seed)
    train_q, train_tsv = split_files(data_dir, "train")  # inputs first: a bad one leaves no run dir
    valid_q, valid_tsv = split_files(data_dir, "valid")
    ckpt = load_checkpoint(os.path.join(out_dir, "last.pt")) if resume else None  # refused before any work
    if ckpt is not None and not RESUME_KEYS <= ckpt.keys():
        raise CheckpointError(f"{os.path.join(out_dir, 'last.pt')}: cannot resume from it: it lacks "
                              f"{', '.join(sorted(RESUME_KEYS - ckpt.keys()))}")
    os.makedirs(out_dir, exist_ok=True)
    source = FAMILIES[cfg.model.family].tokenizer_source(cfg.model)
    if world.main:
        tokenizer = prepare_tokenizer(cfg.model.text.tokenizer, source, train_q, out_dir, cfg.data.max_text_length)
    barrier()
    if not world.main:
        tokenizer = prepare_tokenizer(cfg.model.text.tokenizer, source, train_q, out_dir, cfg.data.max_text_length)
    model, arch = create_model(cfg.model, tokenizer.vocab_size)
    optimize_model(model.to(device), device, compiled)  # before the optimizer: its state takes the params' layout
    dataset = PairDataset(train_q, train_tsv, cfg)
    loader = train_loader(dataset, tokenizer, cfg, world.rank, world.size, device,
                          pad_to=cfg.data.max_text_length if compiled else None)
    if world.main and not cfg.eval.untrained and not cfg.data.skip_bad_images:
        # every valid image decodes, or the run stops now rather than after its first epoch
        check_gallery(valid_tsv, size=cfg.data.image_size, rule=cfg.data.resize_rule, batch_size=cfg.eval.batch_size,
                      workers=cfg.data.workers, device=device)
    barrier()
    steps_per_epoch = -(-len(loader) // cfg.train.accum_steps)  # a short last group is stepped too
    total_steps = steps_per_epoch * cfg.train.epochs
    trainable = apply_freeze(model, cfg.train.freeze, 0)
    optimizer = create_optimizer(model, cfg.train)
    scheduler = create_scheduler(optimizer, cfg.train.warmup_steps, total_steps, cfg.train.min_lr_ratio)
    scaler = grad_scaler(precision, device)
    criterion = ClipLoss(cfg.train.label_smoothing, cfg.train.hard_negative_margin, cfg.train.hard_negative_weight,
                         cfg.model.logit_scale_max)
    ema = ModelEma(model, cfg.train.ema) if cfg.train.ema else None
    start_epoch, step, history = 0, 0, []
    best = {"mean_recall": -1.0}
    last_path, best_path = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "best.pt")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        match_param_layout(optimizer)
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        start_epoch, step, history, best = ckpt["epoch"], ckpt["step"], ckpt["history"], ckpt["best"]
        if ema is not None and "ema" in ckpt:
            ema.load_state_dict(ckpt["ema"])
        elif ema is not None and world.main:
            log.warning("%s holds no EMA of the weights: the average starts from the resumed weights", last_path)
        if world.main:
            log.info("resuming %s after epoch %d (step %d)", out_dir, start_epoch, step)
    elif world.main:
        save_config(cfg, os.path.join(out_dir, "config.yaml"))
    n_params = sum(p.numel() for p in model.parameters())
    if world.main:
        log.info("%s model, %.1fM parameters, %s%s on %s x%d; %d pairs, %d steps/epoch, %d epochs",
                 cfg.model.family, n_params / 1e6, precision, ", compiled" if compiled else "", device.type,
                 world.size, len(dataset), steps_per_epoch, cfg.train.epochs)
    ddp = None

    def valid_scores(label: str = "valid") -> dict:
        return evaluate(model, tokenizer, valid_q, valid_tsv, size=cfg.data.image_size, rule=cfg.data.resize_rule,
                        batch_size=cfg.eval.batch_size, workers=cfg.data.workers, device=device, precision=precision,
                        skip_bad=cfg.data.skip_bad_images, label=label).as_dict()

    def score_now(epoch: int, train_loss, samples_s) -> dict:
        record = {"epoch": epoch, "step": step, "train_loss": train_loss, "samples_per_s": samples_s, **valid_scores()}
        if ema is not None and epoch > 0:
            with ema.applied(model):
                record["ema"] = valid_scores("valid (EMA)")
        return record

    if not resume and cfg.eval.untrained and world.main:
        record = score_now(0, None, None)
        history.append(record)
        log.info("untrained model: MR %.2f", record["mean_recall"])
    barrier()
    for epoch in range(start_epoch, cfg.train.epochs):
        now = apply_freeze(model, cfg.train.freeze, epoch)
        if ddp is None or now != trainable:
            ddp, trainable = wrap_ddp(model, world, device), now
        seed_everything(data_seed(cfg.train) * 1000 + epoch)  # dropout etc.: a function of (seed, epoch) alone
        loader.sampler.set_epoch(epoch)
        if compiled and epoch == start_epoch and world.main:
            log.info("the first batch compiles the model (torch.compile): a minute or more, once")
        stats = train_one_epoch(ddp, criterion, loader, optimizer, scheduler, scaler, cfg, precision, device, world,
                                epoch, step, ema=ema)
        loss, step, samples_s = stats.loss, stats.step, stats.steady_samples_s
        last_epoch = epoch + 1 == cfg.train.epochs
        if world.main:
            if (epoch + 1) % cfg.eval.every_epochs == 0 or last_epoch:
                record = score_now(epoch + 1, loss, samples_s)
            else:
                record = {"epoch": epoch + 1, "step": step, "train_loss": loss, "samples_per_s": samples_s}
            history.append(record)
            candidate = _best_candidate(record)
            if candidate.get("mean_recall", -1) > best["mean_recall"]:
                best = candidate
                with ema.applied(model) if candidate.get("weights") == "ema" else contextlib.nullcontext():
                    save_checkpoint(best_path, {"model": model.state_dict(), "arch": arch, "config": to_dict(cfg),
                                                "epoch": epoch + 1, "metrics": candidate})
            save_checkpoint(last_path, {
                "model": model.state_dict(), "arch": arch, "config": to_dict(cfg), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                "epoch": epoch + 1, "step": step, "history": history, "best": best,
                **({"ema": ema.state_dict()} if ema is not None else {})})
            atomic_write_text(os.path.join(out_dir, "metrics.jsonl"),
                              "".join(json.dumps(h) + "\n" for h in history))
            plot_curves(history, os.path.join(out_dir, "curves.png"))
        barrier()
    if world.main:
        untrained = next((h for h in history if h["epoch"] == 0), None)
        msg = f"best valid MR {best['mean_recall']:.2f} at epoch {best.get('epoch')}"
        if best.get("weights") == "ema":
            msg += " (the EMA of the weights)"
        if untrained:
            msg += f" (untrained MR {untrained['mean_recall']:.2f})"
        log.info("%s; run in %s", msg, out_dir)
    return best
