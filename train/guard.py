"""The divergence guard: an update whose loss or gradients are not finite is skipped, not applied,
and a run whose updates are skipped `train.max_skipped_steps` times in a row stops with
`TrainingDiverged`, naming the step, the learning rates and what to try.

Chinese-CLIP's users' most frequent complaint is a fine-tune that went NaN and trained on, an
hour an epoch, until evaluation failed on NaN embeddings. Here the weights never take a
non-finite update, so `best.pt` and the last `last.pt` stay good and resumable.

No host sync per step on a GPU: the verdict is a device tensor. The fused AdamW (on CUDA) takes
it as `found_inf` and skips the update in its kernel, as it does for GradScaler; on a CPU there
is no device queue to stall, and the step branches on it. With fp16 the GradScaler already
skips an update whose gradients overflowed (and lowers its scale): that is its normal work, so
there only a non-finite loss counts. The counters live on the device too and are read where the
loop syncs anyway (log steps, the epoch's end); under DDP the stop is agreed by all ranks.
"""
from __future__ import annotations

import torch

from .distributed import distributed
from .optim import top_learning_rates


class TrainingDiverged(RuntimeError):
    """Updates were skipped for non-finite values too many times in a row: the run stops."""


class DivergenceGuard:
    def __init__(self, limit: int, device: torch.device):
        self.limit = limit
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = zero.clone()           # updates skipped so far in this process
        self.streak = zero.clone()            # the current run of skipped updates
        self.tripped_at = zero.clone() - 1    # the step at which a streak first reached `limit` (-1: none)
        self.loss_not_finite = torch.zeros((), dtype=torch.bool, device=device)  # in this accumulation group

    def add_loss(self, loss: torch.Tensor) -> None:
        """Note one batch's loss (of the group the next update applies)."""
        self.loss_not_finite |= ~torch.isfinite(loss)

    def verdict(self, grad_norm: torch.Tensor | None) -> torch.Tensor:
        """Whether the update now due must be skipped (a device bool): its group's loss, or its
        gradients' total norm (None with fp16, whose GradScaler judges the gradients itself)."""
        bad = self.loss_not_finite.clone()
        if grad_norm is not None:
            bad |= ~torch.isfinite(grad_norm)
        self.loss_not_finite.zero_()
        return bad

    def record(self, bad: torch.Tensor, step: int) -> None:
        """Count the update `step` (1-based), skipped or not."""
        count = bad.to(torch.int64)
        self.skipped += count
        self.streak = (self.streak + 1) * count
        first = (self.streak >= self.limit) & (self.tripped_at < 0)
        self.tripped_at = torch.where(first, torch.full_like(self.tripped_at, step), self.tripped_at)

    def check(self, optimizer: torch.optim.Optimizer, epoch: int, advice: str) -> None:
        """Raise `TrainingDiverged` once `limit` updates in a row were skipped (a host sync)."""
        at = _agreed(self.tripped_at)
        if at >= 0:
            self._stop(optimizer, epoch, advice, f"updates {at - self.limit + 1} to {at} all had a non-finite loss or "
                                                 f"gradients and were skipped (train.max_skipped_steps={self.limit})")

    def check_epoch(self, updates: int, skipped: int, optimizer: torch.optim.Optimizer, epoch: int,
                    advice: str) -> None:
        """At an epoch's end: `check`, and raise `TrainingDiverged` when every one of its `updates`
        was skipped, however few: an epoch that took no update has nothing to score or keep."""
        self.check(optimizer, epoch, advice)
        if updates and _agreed(torch.tensor(skipped, device=self.skipped.device)) >= updates:
            self._stop(optimizer, epoch, advice, f"every one of its {updates} updates had a non-finite loss or "
                                                 "gradients and was skipped, so it took none")

    def _stop(self, optimizer: torch.optim.Optimizer, epoch: int, advice: str, what: str) -> None:
        shown = ", ".join(f"{name} {lr:.2g}" for name, lr in top_learning_rates(optimizer).items())
        raise TrainingDiverged(
            f"training diverged in epoch {epoch + 1}: {what}; learning rates then: {shown}. The weights took none of "
            f"those updates: the checkpoints already written (best.pt, last.pt) are as the last good epoch left them. "
            f"Try {advice}")

    def skipped_count(self) -> int:
        return int(self.skipped)


def _agreed(value: torch.Tensor) -> int:
    """`value` as every rank's maximum (a host sync): every rank stops, or none does."""
    value = value.clone()
    if distributed():
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return int(value)


def divergence_advice(lr: dict, grad_clip: float | None, precision: str) -> str:
    """What to change, for the message: the rates first, then what the run does not use yet."""
    lower = ", ".join(f"train.lr.{k}={v / 10:.1g}" for k, v in lr.items())
    tips = [f"lower learning rates ({lower}, a tenth of these)"]
    if not grad_clip:
        tips.append("gradient clipping (train.grad_clip=1.0)")
    if precision == "fp16":
        tips.append("bf16 where the GPU has it (train.precision=bf16)")
    return " or ".join(tips) + ", and train again."
