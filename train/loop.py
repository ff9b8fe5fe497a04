"""One epoch over the loader, around `train.step.train_step`: what `train.main` runs each epoch and
what `muge bench train` times (the loop over real data). It only iterates, times and logs: data
wait vs compute, the progress bar, the log lines, TensorBoard."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .distributed import unwrap
from .speed import synchronize
from .step import train_step

log = logging.getLogger(__name__)
LOG_INTERVAL_S = 60.0  # at most one "where the time goes" line a minute (the bar shows it at every log step)
STARVED = 0.25  # a data-wait share above this is called out


@dataclass
class WaitClock:
    """Where an interval's time goes, as open_clip's log shows it: waiting for the loader's next
    batch (data) vs everything else (compute: transfer, forward, backward, step). The host waits
    for the device only at log steps, so over an interval the split is what the device allows."""
    data_s: float = 0.0
    total_s: float = 0.0
    batches: int = 0

    def add(self, data_s: float, total_s: float) -> None:
        self.data_s, self.total_s, self.batches = self.data_s + data_s, self.total_s + total_s, self.batches + 1

    @property
    def data_share(self) -> float:
        return self.data_s / max(self.total_s, 1e-9)

    def describe(self) -> str:
        per_batch = max(self.batches, 1)
        starved = "; the loader starves the model: raise data.workers" if self.data_share > STARVED else ""
        return (f"data wait {self.data_s / per_batch:.3f}s/batch ({100 * self.data_share:.0f}%), compute "
                f"{(self.total_s - self.data_s) / per_batch:.3f}s/batch{starved}")


@dataclass
class EpochStats:
    loss: float
    step: int
    samples_per_s: float      # the whole epoch, start-up included
    steady_samples: int       # samples after the first `warmup` batches (compile, cuDNN autotuning, workers' start)
    steady_s: float
    first_batch_s: float      # the first batch's wall time: a compiled model's one-time compile shows here
    skipped_steps: int = 0    # updates skipped for a non-finite loss or gradients (`train.guard`)

    @property
    def steady_samples_per_s(self) -> float:
        return self.steady_samples / max(self.steady_s, 1e-9)


def train_one_epoch(training, model, epoch: int, step: int, *, max_batches: int | None = None,
                    warmup: int = 3, tracker=None) -> EpochStats:
    """One pass over `training.loader` (or its first `max_batches`), a `train_step` a batch. The host
    waits for the device only at log intervals and at the `warmup` mark, where `tracker`
    (`train.tracking.Tracker`) also records the step's figures."""
    train_cfg, loader, world, device = training.cfg.train, training.loader, training.world, training.device
    parts = training.step_parts(epoch)
    skipped_before = parts.guard.skipped_count()
    model.train()
    n = len(loader) if max_batches is None else min(max_batches, len(loader))
    running, seen = RunningLoss(device), 0
    warmup = max(0, min(warmup, n - 1))
    start = fetch = logged = time.perf_counter()
    first_batch_s, steady, epoch_clock, clock = 0.0, (start, 0), WaitClock(), WaitClock()
    bar = tqdm(loader, total=n, desc=f"epoch {epoch + 1}/{train_cfg.epochs}", disable=not world.main, leave=False)
    for i, batch in enumerate(bar):
        got = time.perf_counter()
        if i == warmup:
            synchronize(device)
            steady = (time.perf_counter(), seen)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        # the epoch's last group may be short: it is stepped too (its gradients must not leak into
        # the next epoch, and last.pt holds none), averaged over its own length
        group = min(train_cfg.accum_steps, n - (i - i % train_cfg.accum_steps))
        boundary = (i + 1) % train_cfg.accum_steps == 0 or i == n - 1
        loss, step = train_step(parts, model, batch, group=group, boundary=boundary, step=step)
        running.add(loss)
        seen += len(batch["pixels"]) * world.size
        if i == 0:
            synchronize(device)
            first_batch_s = time.perf_counter() - start
        if world.main and (i % train_cfg.log_every == 0 or i == n - 1):
            _show_progress(training, model, bar, tracker, step, running.mean(), seen / (time.perf_counter() - start),
                           clock.data_share)
        now = time.perf_counter()
        for c in (clock, epoch_clock):
            c.add(got - fetch, now - fetch)
        if world.main and now - logged >= LOG_INTERVAL_S and i + 1 < n:
            log.info("epoch %d, batch %d/%d: %s", epoch + 1, i + 1, n, clock.describe())
            clock, logged = WaitClock(), now
        if i + 1 == n:  # `max_batches`: stop without fetching another batch
            break
        fetch = time.perf_counter()
    synchronize(device)
    end = time.perf_counter()
    skipped = parts.guard.skipped_count() - skipped_before
    stats = EpochStats(loss=running.mean(), step=step, samples_per_s=seen / max(end - start, 1e-9),
                       steady_samples=seen - steady[1], steady_s=end - steady[0], first_batch_s=first_batch_s,
                       skipped_steps=skipped)
    if world.main:
        log.info("epoch %d: loss %.4f, %.1f samples/s (%.1f after its first %d batches; the first took %.1fs); %s%s",
                 epoch + 1, stats.loss, stats.samples_per_s, stats.steady_samples_per_s, warmup, first_batch_s,
                 epoch_clock.describe(), f"; {skipped} updates skipped (a non-finite loss or gradients)"
                 if skipped else "")
    return stats


class RunningLoss:
    """The epoch's mean loss so far, summed on the device (no host sync until `mean`); a batch
    whose loss is not finite (its update was skipped, `train.guard`) is left out."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss)
        self.total += torch.where(finite, loss, torch.zeros_like(loss))
        self.count += finite

    def mean(self) -> float:
        return self.total.item() / max(int(self.count), 1)


def _show_progress(training, model, bar, tracker, step: int, loss: float, rate: float, data_share: float) -> None:
    """A log step's figures on the progress bar and, with `train.tensorboard`, in TensorBoard."""
    inverse_temperature = unwrap(model).logit_scale.exp().item()
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{training.optimizer.param_groups[0]['lr']:.2e}",
                    temp=f"{1 / inverse_temperature:.4f}",
                    samples_per_s=f"{rate:.1f}", data=f"{100 * data_share:.0f}%", refresh=False)
    if tracker is not None:
        tracker.step(step, loss=loss, optimizer=training.optimizer, inverse_temperature=inverse_temperature,
                     samples_per_s=rate,
                     data_wait_share=data_share, skipped_steps=training.guard.skipped_count())
