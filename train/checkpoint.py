"""Checkpoints, written atomically: `last.pt` holds everything needed to resume; `best.pt` the
model, its architecture and the config (what `muge export` needs). Only tensors and plain data
go in, so `model.weights.load_checkpoint` reads them back with `weights_only=True`; the RNG and
optimizer state that resuming restores are here too.
"""
from __future__ import annotations

import torch

from infra.io import atomic_path


def save_checkpoint(path: str, state: dict) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain data (numpy's key array becomes a list)."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give loaded optimizer state its parameter's memory layout: fused and foreach AdamW walk a
    parameter and its moments as flat memory, so a checkpoint saved with other strides (a CPU run
    resumed on CUDA, where weights are channels-last) must not pair the wrong elements."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
