"""One optimizer step and one epoch over the loader: what `train.main` runs each epoch and what
`muge bench train` times (the bare step, and the loop over real data)."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .speed import synchronize
from .step import forward_backward

log = logging.getLogger(__name__)


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass
class EpochStats:
    loss: float
    step: int
    samples_per_s: float      # the whole epoch, start-up included
    steady_samples: int       # samples after the first `warmup` batches (compile, cuDNN autotuning, workers' start)
    steady_s: float
    first_batch_s: float      # the first batch's wall time: a compiled model's one-time compile shows here

    @property
    def steady_samples_per_s(self) -> float:
        return self.steady_samples / max(self.steady_s, 1e-9)


def train_step(tr, model, batch: dict, *, group: int = 1, boundary: bool = True) -> torch.Tensor:
    """Forward and backward one batch (as 1/`group` of an accumulation group) and, at a group's
    `boundary`, clip, step and clamp. `tr` is the run's `Training`; `model` is its model or the
    DDP wrapper of it. Returns the detached loss, on the device: no host sync."""
    train_cfg = tr.cfg.train
    skip_sync = not boundary and isinstance(model, DistributedDataParallel)
    with model.no_sync() if skip_sync else contextlib.nullcontext():
        loss = forward_backward(model, tr.criterion, batch, precision=tr.precision, device=tr.device,
                                scaler=tr.scaler, scale=1.0 / group, chunk=train_cfg.grad_cache_chunk)
    if boundary:
        if train_cfg.grad_clip:
            tr.scaler.unscale_(tr.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], train_cfg.grad_clip)
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
        tr.optimizer.zero_grad(set_to_none=True)
        tr.scheduler.step()
        unwrap(model).clamp_logit_scale()
    return loss


def train_one_epoch(tr, model, epoch: int, step: int, *, max_batches: int | None = None,
                    warmup: int = 3, tracker=None) -> EpochStats:
    """One pass over `tr.loader` (or its first `max_batches`), updating the EMA after each
    optimizer step. The host waits for the device only at log intervals and at the `warmup` mark,
    where `tracker` (`train.tracking.Tracker`) also records the step's figures."""
    train_cfg, loader, world, device = tr.cfg.train, tr.loader, tr.world, tr.device
    model.train()
    n = len(loader) if max_batches is None else min(max_batches, len(loader))
    total, count, seen = torch.zeros((), device=device), 0, 0
    warmup = max(0, min(warmup, n - 1))
    start = time.perf_counter()
    first_batch_s, steady = 0.0, (start, 0)
    bar = tqdm(loader, total=n, desc=f"epoch {epoch + 1}/{train_cfg.epochs}", disable=not world.main, leave=False)
    for i, batch in enumerate(bar):
        if i == warmup:
            synchronize(device)
            steady = (time.perf_counter(), seen)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        # the epoch's last group may be short: it is stepped too (its gradients must not leak into
        # the next epoch, and last.pt holds none), averaged over its own length
        group = min(train_cfg.accum_steps, n - (i - i % train_cfg.accum_steps))
        boundary = (i + 1) % train_cfg.accum_steps == 0 or i == n - 1
        total += train_step(tr, model, batch, group=group, boundary=boundary)
        step += boundary
        if boundary and tr.ema is not None:
            tr.ema.update(unwrap(model))
        count += 1
        seen += len(batch["pixels"]) * world.size
        if i == 0:
            synchronize(device)
            first_batch_s = time.perf_counter() - start
        if world.main and (i % train_cfg.log_every == 0 or i == n - 1):
            scale, loss = unwrap(model).logit_scale.exp().item(), total.item() / count
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{tr.optimizer.param_groups[0]['lr']:.2e}",
                            temp=f"{1 / scale:.4f}", samples_per_s=f"{rate:.1f}", refresh=False)
            if tracker is not None:
                tracker.step(step, loss=loss, optimizer=tr.optimizer, logit_scale=scale, samples_per_s=rate)
        if i + 1 == n:  # `max_batches`: stop without fetching another batch
            break
    synchronize(device)
    end = time.perf_counter()
    stats = EpochStats(loss=total.item() / max(count, 1), step=step, samples_per_s=seen / max(end - start, 1e-9),
                       steady_samples=seen - steady[1], steady_s=end - steady[0], first_batch_s=first_batch_s)
    if world.main:
        log.info("epoch %d: loss %.4f, %.1f samples/s (%.1f after its first %d batches; the first took %.1fs)",
                 epoch + 1, stats.loss, stats.samples_per_s, stats.steady_samples_per_s, warmup, first_batch_s)
    return stats
