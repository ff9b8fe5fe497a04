"""TensorBoard logging of a run (`train.tensorboard: true`), as open_clip does: event files in
`RUN/tensorboard/`, written by rank 0. Per logged step: the loss, each parameter group's top
learning rate, the logit scale, samples/s and the updates skipped so far for non-finite values;
per scored epoch: valid R@1/5/10, MR and MRR (and the EMA's). `tensorboard` is an optional
dependency (`pip install tensorboard`)."""
from __future__ import annotations

import os

from .optim import top_learning_rates


class Tracker:
    """Writes scalars when enabled; does nothing otherwise, so callers need not ask."""

    def __init__(self, run_dir: str | None):
        self.writer = None
        if run_dir is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))

    def step(self, step: int, *, loss: float, optimizer, inverse_temperature: float, samples_per_s: float,
             data_wait_share: float = 0.0, skipped_steps: int = 0) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/skipped_steps", skipped_steps, step)  # non-finite updates, so far
        self.writer.add_scalar("train/data_wait_share", data_wait_share, step)
        self.writer.add_scalar("train/inverse_temperature", inverse_temperature, step)
        self.writer.add_scalar("train/samples_per_s", samples_per_s, step)
        for name, lr in top_learning_rates(optimizer).items():
            self.writer.add_scalar(f"lr/{name}", lr, step)

    def epoch(self, record: dict) -> None:
        if self.writer is None or "mean_recall" not in record:
            return
        for prefix, scores in (("valid", record), ("valid_ema", record.get("ema") or {})):
            for key in ("r1", "r5", "r10", "mean_recall", "mrr"):
                if key in scores:
                    self.writer.add_scalar(f"{prefix}/{key}", scores[key], record["epoch"])
        if record.get("train_loss") is not None:
            self.writer.add_scalar("train/epoch_loss", record["train_loss"], record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
