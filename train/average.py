"""`muge average RUN_A RUN_B ... --out RUN`: a uniform soup of runs (Wortsman et al., 2022).

Runs fine-tuned from the same start (the same pretrained weights, or the same seed) often sit in
one basin, where the mean of their weights scores like an ensemble at the cost of one model.
Runs that do not share an architecture and a tokenizer are refused: their weights do not line
up. Floating-point tensors are averaged; integer buffers (BatchNorm's step counters) are
taken from the first run. The result is a run directory (`best.pt`, `config.yaml`,
`tokenizer/`) that `muge export` takes like any other, scored on valid when `data_dir` is given.
"""
from __future__ import annotations

import filecmp
import logging
import os
import shutil

import torch

from infra.io import sha256
from infra.outputs import OutputKind, check_output, staged_dir
from model.factory import plain_checkpoint
from model.weights import CheckpointError, checkpoint_path, load_checkpoint

from .checkpoint import save_checkpoint
from .config import read_preset

log = logging.getLogger(__name__)


def _same_tokenizer(a: str, b: str) -> bool:
    cmp = filecmp.dircmp(os.path.join(a, "tokenizer"), os.path.join(b, "tokenizer"))
    return not (cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files)


def average_state_dicts(states: list[dict], names: list[str]) -> dict:
    """The uniform mean of `states` (same keys, shapes and dtypes), accumulated in fp64."""
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        if state.keys() != first.keys():
            extra = sorted(state.keys() ^ first.keys())[0]
            raise CheckpointError(f"{name}: its weights do not match {names[0]}'s ({extra} is in one only)")
        for k, v in state.items():
            if v.shape != first[k].shape or v.dtype != first[k].dtype:
                raise CheckpointError(f"{name}: {k} is {tuple(v.shape)} {v.dtype}, {names[0]} has "
                                      f"{tuple(first[k].shape)} {first[k].dtype}")
    out = {}
    for k, v in first.items():
        if v.dtype.is_floating_point:
            total = sum(s[k].double() for s in states)
            out[k] = (total / len(states)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def _check_inputs(run_dirs: list[str]) -> None:
    """Refuse before reading any weights: an input without its config or tokenizer."""
    for run in run_dirs:
        read_preset(os.path.join(run, "config.yaml"))  # a mapping, or a ConfigError naming the file
        if not os.path.isfile(os.path.join(run, "tokenizer", "tokenizer.json")):
            raise CheckpointError(f"{os.path.join(run, 'tokenizer')}: no tokenizer.json: {run} is not a run "
                                  "directory")


def _is_soup(path: str) -> bool:
    """A soup written before the output marker: its best.pt records the runs it averaged."""
    try:
        return "soup" in load_checkpoint(os.path.join(path, "best.pt"), mmap=True)
    except CheckpointError:
        return False


SOUP = OutputKind("soup", recognise=_is_soup)


def average_runs(run_dirs: list[str], out_dir: str, checkpoint: str = "best", data_dir: str | None = None,
                 overwrite: bool | None = None) -> dict:
    """Write the soup of `run_dirs` to `out_dir` (built beside it, renamed into place when
    complete; an earlier soup is replaced, nothing else unless `overwrite`: `infra.outputs`);
    returns its best.pt metadata (with valid metrics when `data_dir` is given)."""
    if len(run_dirs) < 2:
        raise ValueError("muge average needs two or more runs")
    check_output(out_dir, SOUP, [*run_dirs, data_dir], overwrite)
    _check_inputs(run_dirs)
    paths = [checkpoint_path(r, checkpoint) for r in run_dirs]
    ckpts = [plain_checkpoint(p) for p in paths]  # a LoRA run's last.pt: its adapters merged
    for path, ckpt, run in zip(paths[1:], ckpts[1:], run_dirs[1:]):
        if ckpt["arch"] != ckpts[0]["arch"]:
            differ = sorted(k for k in ckpt["arch"].keys() | ckpts[0]["arch"].keys()
                            if ckpt["arch"].get(k) != ckpts[0]["arch"].get(k))
            raise CheckpointError(f"{path}: a different architecture from {paths[0]} ({', '.join(differ[:3])} "
                                  "differ): only runs of one model can be averaged")
        if not _same_tokenizer(run_dirs[0], run):
            raise CheckpointError(f"{os.path.join(run, 'tokenizer')} differs from {run_dirs[0]}'s: the runs' token "
                                  "ids do not line up, so their weights cannot be averaged")
    model = average_state_dicts([c["model"] for c in ckpts], paths)
    soup = {"model": model, "arch": ckpts[0]["arch"], "config": ckpts[0]["config"], "epoch": None,
            "soup": [{"checkpoint": os.path.abspath(p), "sha256": sha256(p), "epoch": c.get("epoch"),
                      "metrics": c.get("metrics")} for p, c in zip(paths, ckpts)]}
    for path, c in zip(paths, ckpts):
        mr = (c.get("metrics") or {}).get("mean_recall")
        log.info("%s: epoch %s, valid MR %s", path, c.get("epoch"), f"{mr:.2f}" if mr is not None else "n/a")
    if data_dir:
        soup["metrics"] = score_soup(soup, run_dirs[0], data_dir).as_dict()
    with staged_dir(out_dir, SOUP, [*run_dirs, data_dir], overwrite) as tmp:
        shutil.copytree(os.path.join(run_dirs[0], "tokenizer"), os.path.join(tmp, "tokenizer"))
        shutil.copy2(os.path.join(run_dirs[0], "config.yaml"), os.path.join(tmp, "config.yaml"))
        save_checkpoint(os.path.join(tmp, "best.pt"), soup)
    return {k: v for k, v in soup.items() if k != "model"}


def score_soup(soup: dict, run_dir: str, data_dir: str):
    """The soup's valid Score (the model out of `model.factory`, with the first run's tokenizer),
    evaluated like the training loop does."""
    from competition.layout import split_files
    from model.factory import checkpoint_model

    from .config import config_from_dict
    from .distributed import World, device_for
    from .evaluate import EvalSettings, evaluate
    from .precision import resolve_precision

    cfg = config_from_dict(soup["config"], soup["soup"][0]["checkpoint"])  # the first run's config
    device = device_for(World())
    loaded = checkpoint_model(soup, "the soup", run_dir)
    queries, tsv = split_files(data_dir, "valid")
    settings = EvalSettings.of_run(cfg, device, resolve_precision(cfg.train.precision, device))
    with torch.no_grad():
        return evaluate(loaded.model.to(device), loaded.tokenizer, queries, tsv, settings, label="valid (soup)")
