"""A run's curves, `curves.png`, from its history (`infra.history` writes `metrics.jsonl`)."""
from __future__ import annotations

import os


def plot_curves(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, recall_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    trained = [h for h in history if h.get("train_loss") is not None]
    loss_ax.plot([h["epoch"] for h in trained], [h["train_loss"] for h in trained], "o-")
    loss_ax.set(title="train loss", xlabel="epoch")
    for key in ("r1", "r5", "r10", "mean_recall"):
        recall_ax.plot(epochs, [h.get(key) for h in history], "o-", label=key)
    if any("ema" in h for h in history):
        recall_ax.plot(epochs, [h.get("ema", {}).get("mean_recall") for h in history], "s--",
                       label="mean_recall (EMA)")
    recall_ax.set(title="valid recall (x100)", xlabel="epoch")
    recall_ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
