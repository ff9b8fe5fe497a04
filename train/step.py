"""One batch's forward and backward: plain, or gradient-cached for a large batch on small memory.

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

import torch

from .distributed import unwrap
from .precision import autocast


def forward_backward(model, criterion, batch: dict, *, precision, device, scaler, scale: float = 1.0,
                     chunk: int | None = None) -> torch.Tensor:
    """Accumulate the gradients of `scale` x the batch's loss; return the detached global-batch loss."""
    if chunk and chunk < len(batch["pixels"]):
        return grad_cache_step(model, criterion, batch, precision=precision, device=device, scaler=scaler,
                               scale=scale, chunk=chunk)
    with autocast(precision, device):
        img, txt, log_scale = model(batch["pixels"], batch["input_ids"], batch["attention_mask"])
    loss, value = criterion(img, txt, log_scale, batch["image_ids"], batch["query_ids"])
    scaler.scale(loss * scale).backward()
    return value


def _rng_state(device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def grad_cache_step(model, criterion, batch: dict, *, precision, device, scaler, scale: float = 1.0,
                    chunk: int) -> torch.Tensor:
    module = unwrap(model)
    slices = [slice(i, i + chunk) for i in range(0, len(batch["pixels"]), chunk)]

    def run(sl, net):
        with autocast(precision, device):
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
    loss, value = criterion(img, txt, log_scale, batch["image_ids"], batch["query_ids"])
    scaler.scale(loss * scale).backward()

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
