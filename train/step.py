"""One training step, top to bottom in `train_step`: forward under autocast, the loss, backward
(or its gradient-cached variant, `grad_cache_backward`, beside it), and at an accumulation
group's last batch: clip, judge the update (`train.guard`), apply it or skip it (`apply_update`),
step the schedule, clamp the logit scale, move the EMA of the weights, count the step and, every
`check_every` updates, ask the guard whether the run has diverged. `train.loop` only iterates,
times and logs around it; a new loss term or a change to the step is made here.

Gradient caching (Gao et al. 2021, "GradCache"; open_clip's `accum_freq` does the same job)
trains a batch of B exactly while holding activations for only `chunk` pairs at a time:
1. embed the whole batch without grad, chunk by chunk, recording each chunk's RNG state;
2. compute the contrastive loss over the full batch on those embeddings (leaves) and backward
   it, which gives d loss / d embedding for every pair and d loss / d logit_scale;
3. re-run each chunk with grad under the RNG state it had in step 1 (same dropout masks) and
   backward its embeddings with their cached gradients.
Parameter gradients equal the full-batch step's up to float rounding. Under DDP, gradients
are all-reduced once, with the last chunk. BatchNorm towers see chunk statistics (as with
plain accumulation); step 1's updates to their running statistics are rolled back, so those
are updated once per chunk.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from .distributed import unwrap
from .ema import ModelEma
from .guard import DivergenceGuard
from .precision import autocast


@dataclass
class StepParts:
    """What one optimizer step uses (`Training.step_parts`)."""
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    precision: str
    device: torch.device
    guard: DivergenceGuard
    grad_clip: float | None = None
    grad_cache_chunk: int | None = None
    ema: ModelEma | None = None        # moved towards the weights after every update
    check_every: int = 0               # updates between the guard's stop checks (a host sync); 0: none here
    epoch: int = 0                     # the epoch, and what to try, for the guard's message
    advice: str = ""


def train_step(parts: StepParts, model, batch: dict, *, group: int = 1, boundary: bool = True,
               step: int = 0) -> tuple[torch.Tensor, int]:
    """Forward and backward one batch, as 1/`group` of an accumulation group; at the group's
    `boundary`, the update (optimizer step `step + 1`) and what follows it. `model` is the model
    or its DDP wrapper. Returns (the batch's detached global loss, on the device: no host sync but
    on a CPU; the optimizer steps taken so far)."""
    skip_sync = not boundary and isinstance(model, DistributedDataParallel)  # all-reduce once, at the boundary
    with model.no_sync() if skip_sync else contextlib.nullcontext():
        if parts.grad_cache_chunk and parts.grad_cache_chunk < len(batch["pixels"]):
            value = grad_cache_backward(parts, model, batch, 1.0 / group)
        else:
            with autocast(parts.precision, parts.device):
                img, txt, log_scale = model(batch["pixels"], batch["input_ids"], batch["attention_mask"])
            loss, value = parts.criterion(img, txt, log_scale, batch["image_ids"], batch["query_ids"])
            parts.scaler.scale(loss * (1.0 / group)).backward()
    parts.guard.add_loss(value)
    if not boundary:
        return value, step
    params = [p for p in (*model.parameters(), *parts.criterion.parameters()) if p.grad is not None]
    scaled = parts.scaler.is_enabled()
    norm = None
    if parts.grad_clip:
        parts.scaler.unscale_(parts.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, parts.grad_clip)
    elif not scaled:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    skip = parts.guard.verdict(None if scaled else norm)  # a non-finite loss or gradients: no update
    apply_update(parts, skip)
    parts.guard.record(skip, step + 1)
    parts.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped update steps the schedule too, as GradScaler's do; torch
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))  # for a bug
        parts.scheduler.step()
    module = unwrap(model)
    module.clamp_logit_scale()
    if parts.ema is not None:
        parts.ema.update(module)
    if parts.check_every and (step + 1) % parts.check_every == 0:
        parts.guard.check(parts.optimizer, parts.epoch, parts.advice)  # every rank: all stop, or none
    return value, step + 1


def apply_update(parts: StepParts, skip: torch.Tensor) -> None:
    """The optimizer's step, or none where `skip` (the guard's verdict, a device bool) says so, with
    no host sync on a GPU: fp16's GradScaler skips an update whose gradients overflowed (and lowers
    its scale); CUDA's fused AdamW takes the verdict and skips in its kernel; on a CPU, with no
    device queue to stall, the step branches on it."""
    if parts.scaler.is_enabled():
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    elif parts.optimizer.defaults.get("fused"):
        # `found_inf` is how GradScaler hands its verdict to a fused optimizer (torch.amp.GradScaler
        # sets it, torch.optim.Adam reads it with getattr): torch's own hand-over, used the same way.
        # tests/test_divergence.py's fused case fails if torch stops reading it.
        parts.optimizer.found_inf = skip.to(torch.float32)
        try:
            parts.optimizer.step()
        finally:
            del parts.optimizer.found_inf
    elif not skip.item():
        parts.optimizer.step()


def grad_cache_backward(parts: StepParts, model, batch: dict, scale: float = 1.0) -> torch.Tensor:
    """`train_step`'s backward for a batch larger than `parts.grad_cache_chunk`, in chunks (above):
    the same gradients, and the same returned loss."""
    module, chunk, device = unwrap(model), parts.grad_cache_chunk, parts.device
    slices = [slice(i, i + chunk) for i in range(0, len(batch["pixels"]), chunk)]

    def run(sl, net):
        with autocast(parts.precision, device):
            return net(batch["pixels"][sl], batch["input_ids"][sl], batch["attention_mask"][sl])

    buffers = {name: b.clone() for name, b in module.named_buffers()}
    states, images, texts = [], [], []
    with torch.no_grad():
        for sl in slices:
            states.append(_rng_state(device))
            img, txt, _ = run(sl, module)
            images.append(img)
            texts.append(txt)
        for name, b in module.named_buffers():
            b.copy_(buffers[name])
    after = _rng_state(device)

    img = torch.cat(images).detach().requires_grad_()
    txt = torch.cat(texts).detach().requires_grad_()
    log_scale = module.logit_scale.detach().requires_grad_()
    loss, value = parts.criterion(img, txt, log_scale, batch["image_ids"], batch["query_ids"])
    parts.scaler.scale(loss * scale).backward()

    for k, sl in enumerate(slices):
        last = k == len(slices) - 1
        sync = contextlib.nullcontext() if last or module is model else model.no_sync()
        with sync:
            _set_rng_state(states[k], device)
            img_k, txt_k, scale_k = run(sl, model)
            outputs, grads = [img_k, txt_k], [img.grad[sl].to(img_k.dtype), txt.grad[sl].to(txt_k.dtype)]
            if scale_k.requires_grad:  # its gradient is complete after step 2: added once, with the last chunk
                outputs.append(scale_k)
                grads.append(log_scale.grad if last else torch.zeros_like(log_scale.grad))
            torch.autograd.backward(outputs, grads)
    _set_rng_state(after, device)
    return value


def _rng_state(device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
