"""Checkpoints, written atomically: `last.pt` holds everything needed to resume; `best.pt` the
model, its architecture and the config (what `muge export` needs)."""
from __future__ import annotations

import os

import torch

from competition.io import atomic_path


def save_checkpoint(path: str, state: dict) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    return torch.load(path, map_location=map_location, weights_only=False)


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
