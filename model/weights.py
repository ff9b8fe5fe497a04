"""Weights read safely: a muge checkpoint (`load_checkpoint`, `checkpoint_path`), any torch file
(`safe_load`), a state dict into a model (`load_weights`) and published `transformers` weights
(`load_pretrained`, `hub_source`).

Everything in a checkpoint is tensors and plain data (dicts, lists, tuples, numbers, strings),
so it loads with `torch.load(weights_only=True)`: a file from elsewhere cannot run code when
it is opened, and one holding anything else is refused with a clear message.
"""
from __future__ import annotations

import os
import pickle

import torch

from competition.errors import first_of


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not one of ours. The message names the file."""


class WeightsError(ValueError):
    """Pretrained weights that cannot be loaded, or do not fill the architecture. Names the source."""


def checkpoint_path(run_dir: str, checkpoint: str = "best") -> str:
    """`checkpoint` as a file: a path as it is, or `best` | `last` inside `run_dir`."""
    return checkpoint if os.path.isfile(checkpoint) else os.path.join(run_dir, f"{checkpoint}.pt")


def is_torch_zip(path: str) -> bool:
    """Whether the file is in torch's zip format (what `torch.save` writes), which memory-maps."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


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


def names_a_local_path(name: str) -> bool:
    """Whether `name` is meant as a path here rather than a hub id (`name` or `org/name`): it exists,
    or is absolute, relative (`./`, `../`, `~`), more than two parts deep, or a weights file's name."""
    return (os.path.lexists(name) or os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or name.endswith(WEIGHT_SUFFIXES))


def _hf_kwargs(name: str) -> dict:
    # a local directory never touches the network
    return {"local_files_only": True} if os.path.isdir(name) else {}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


def hub_source(name: str, model) -> dict:
    """{"pretrained": name, "revision": ...} for a hub name, {"pretrained": the directory} for a
    local one (whose files `ChineseCLIPEncoder.weights_source` hashes when asked)."""
    if os.path.isdir(name):
        return {"pretrained": os.path.abspath(name)}
    return {"pretrained": name, "revision": getattr(model.config, "_commit_hash", None)}


def load_pretrained(cls, name: str, what: str, **kwargs):
    """`cls.from_pretrained(name)`, refusing weights that do not fill the architecture exactly: a
    missing or mis-shaped tensor would be left at its random start, and an unexpected one means
    the weights belong to another model. (A BERT pooler, which no encoder here uses, may be left.)"""
    if os.path.isfile(name):
        raise WeightsError(f"{name}: a file; {what} weights here are a hub name or a directory (config.json beside "
                           "model.safetensors or pytorch_model.bin)")
    try:
        model, info = cls.from_pretrained(name, output_loading_info=True, **_hf_kwargs(name), **kwargs)
    except Exception as exc:  # OSError (not found, no network), safetensors / pickle / JSON errors, size mismatches
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise WeightsError(f"{name}: cannot load {what} weights ({type(exc).__name__}: {reason})") from None
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.split(".", 1)[-1].startswith("pooler.")
                        and not k.startswith("pooler."))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    if missing or unexpected or mismatched:
        raise WeightsError(f"{name}: these weights do not fit a {what} model: "
                           f"{mismatch(missing, unexpected, mismatched)}. They are another architecture's; refused "
                           "rather than trained from a partly random start")
    return model
