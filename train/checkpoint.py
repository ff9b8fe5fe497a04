"""Checkpoints, written atomically: `last.pt` holds everything needed to resume; `best.pt` the
model, its architecture and the config (what `muge export` needs).

Everything in a checkpoint is tensors and plain data (dicts, lists, tuples, numbers, strings),
so it loads with `torch.load(weights_only=True)`: a file from elsewhere cannot run code when
it is opened, and one holding anything else is refused with a clear message.
"""
from __future__ import annotations

import os
import pickle

import torch

from competition.errors import first_of
from infra.io import atomic_path


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not one of ours. The message names the file."""


class WeightsError(ValueError):
    """Pretrained weights that cannot be loaded, or do not fill the architecture. Names the source."""


def checkpoint_path(run_dir: str, checkpoint: str = "best") -> str:
    """`checkpoint` as a file: a path as it is, or `best` | `last` inside `run_dir`."""
    return checkpoint if os.path.isfile(checkpoint) else os.path.join(run_dir, f"{checkpoint}.pt")


def save_checkpoint(path: str, state: dict) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def safe_load(path: str, map_location="cpu", mmap: bool = False, what: str = "checkpoint"):
    """`torch.load(weights_only=True)`: tensors and plain data only, so opening a file from
    elsewhere cannot run code. Refusals are `CheckpointError`s naming `path`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1][:200]
        raise CheckpointError(f"{path}: refused: it holds pickled objects other than tensors and plain data, which "
                              f"could run code when loaded ({reason})") from None
    except Exception as exc:  # truncated, not a zip, not a torch file
        raise CheckpointError(f"{path}: not a readable {what}, truncated or corrupt "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None


def load_checkpoint(path: str, map_location="cpu", mmap: bool = False) -> dict:
    """The checkpoint's dict; with `mmap` its tensors are pages of the file, read when used (an
    export holds one copy of the weights, not two)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    ckpt = safe_load(path, map_location, mmap)
    if not isinstance(ckpt, dict) or not {"model", "arch", "config"} <= ckpt.keys():
        raise CheckpointError(f"{path}: not a muge checkpoint (expected a dict with model, arch and config)")
    for key in ("model", "arch", "config"):
        if not isinstance(ckpt[key], dict):
            raise CheckpointError(f"{path}: not a muge checkpoint: its {key!r} is a {type(ckpt[key]).__name__}, "
                                  "not a mapping")
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in ckpt["model"].items()):
        raise CheckpointError(f"{path}: not a muge checkpoint: its 'model' is not a state dict of named tensors")
    return ckpt


def load_weights(model, state: dict, path: str, hint: str = "", assign: bool = False) -> None:
    """`model.load_state_dict(state)`, or a CheckpointError naming what does not fit (rather than
    torch's page of size mismatches). `assign`: the model takes `state`'s tensors themselves (one
    copy of the weights in memory, not two), cast where their dtype is not the model's."""
    if assign:
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        state = {k: v.to(dtypes[k]) if k in dtypes and v.dtype != dtypes[k] else v for k, v in state.items()}
    try:
        model.load_state_dict(state, assign=assign)
    except RuntimeError:
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in state.items()}
        missing, extra = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
        shapes = sorted(k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k])
        raise CheckpointError(f"{path}: its weights do not fit the model: {mismatch(missing, extra, shapes)}"
                              f"{hint}") from None


def mismatch(missing, unexpected, mis_shaped) -> str:
    """How every "these weights do not fit" message counts and names the tensors at fault."""
    kinds = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
    return "; ".join(f"{len(keys)} {kind} ({first_of(keys, 3)})" for kind, keys in kinds if keys) + " tensors"


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
