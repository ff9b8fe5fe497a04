"""The training memory model: what one process's training holds on its device, measured on the
CPU at a config's shape (random weights), and the sum `muge plan` judges a setting by.

    state     weights, gradients and AdamW state, counted on the model after one optimizer step
              (full fine-tuning: 16 bytes a parameter; LoRA: the frozen weights' 4, and 16 a
              trained parameter)
    per pair  bytes of the tensors autograd saves for backward (counted once per storage) in a
              forward as training runs it, images at the config's size and texts at its length,
              under bf16 autocast as on a GPU: the slope between 1 and 3 pairs, so what is held once
              a step (the autocast copies of the weights) is not counted per pair; with gradient
              checkpointing, plus one image block's own saved tensors (what backward recomputes and
              holds at once). Measured with and without checkpointing, and with and without FLIP
              masking (`FLIP_RATIO` of the patches dropped).
    total     state + chunk x per pair (a gradient-cache chunk, or the whole per-GPU batch), plus on
              several GPUs DDP's gradient buckets (4 bytes a trained parameter)

Not measured (a GPU run is the check): allocator overhead and fragmentation, the attention kernel's
own saved state (SDPA's flash kernel keeps no attention map; the CPU's math path does, so these
per-pair figures are an upper bound there), cuDNN and cuBLAS workspaces; `train.plan` keeps a
margin for them.
"""
from __future__ import annotations

import dataclasses

import torch

from .config import Config

FLIP_RATIO = 0.5  # the masked rows: half the patches dropped (FLIP's, and Chinese-CLIP's --mask-ratio 0.5)
GIB, MIB = 2**30, 2**20


def pair_key(checkpointing: bool, mask_ratio: float) -> str:
    return f"ckpt{int(checkpointing)}-mask{mask_ratio:g}"


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs under bf16
    autocast; its result (and the graph holding them) is dropped at once, so a measurement holds
    one forward's tensors at a time (at ViT-H/14's shape, each holds GiBs)."""
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        # detached (the same storage): a node that saves its own output would otherwise hold it with
        # its grad_fn, a cycle through C++ that no collector frees, and every graph measured would stay
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        fn()
    return sum(seen.values())


def _forward(model, cfg: Config, text_length: int, vocab: int):
    def run(pairs: int):
        size = cfg.data.image_size
        pixels = torch.randint(0, 256, (pairs, size, size, 3), dtype=torch.uint8)
        ids = torch.randint(1, vocab, (pairs, text_length))
        return model.encode_image(pixels), model.encode_text(ids, torch.ones(pairs, text_length, dtype=torch.long))
    return run


def pair_bytes(model, cfg: Config, text_length: int, checkpointing: bool) -> float:
    """Bytes held per pair in a forward as the model is set now, with `checkpointing` plus one
    image block's recompute."""
    block = (model.tower_blocks("image") or [None])[0]
    seen_input = []
    hook = block.register_forward_pre_hook(lambda m, args: seen_input.append(args[0].shape)) if block else None
    forward = _forward(model, cfg, text_length, model.text_vocab_rows)
    saved = {pairs: _saved_bytes(lambda p=pairs: forward(p)) for pairs in (1, 3)}
    if hook:
        hook.remove()
    per_pair = (saved[3] - saved[1]) / 2
    if checkpointing and block is not None:
        model.set_grad_checkpointing(False)  # the block as backward recomputes it: its own tensors saved
        shape = seen_input[0][1:]
        held = {p: _saved_bytes(lambda p=p: block(torch.randn(p, *shape, requires_grad=True), None)) for p in (1, 3)}
        model.set_grad_checkpointing(True)
        per_pair += (held[3] - held[1]) / 2
    return per_pair


def measure(cfg: Config, text_length: int | None = None, ratios: tuple[float, ...] = (0.0, FLIP_RATIO)) -> dict:
    """The memory model of `cfg` (its model with random weights where it names none: give it the
    shape in `model.config`; LoRA where `train.lora.rank` says): parameters, trained parameters,
    state bytes, and bytes per pair with checkpointing off and on at each FLIP mask ratio of
    `ratios` (where the image tower has patches); with the model and optimizer measured."""
    from model.factory import create_model

    from .optim import apply_freeze, create_optimizer

    torch.manual_seed(0)
    model, _ = create_model(cfg.model, lora=dataclasses.replace(cfg.train.lora, dropout=0.0))
    apply_freeze(model, cfg.train.freeze)
    model.train()
    per_pair = {}
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        for ratio in ratios:
            try:
                model.set_mask_ratio(ratio)
            except ValueError:  # an image tower without patches: no FLIP rows
                continue
            per_pair[pair_key(checkpointing, ratio)] = pair_bytes(
                model, cfg, text_length or cfg.data.max_text_length, checkpointing)
    # one step, so every tensor training holds exists: a 1-pair forward, checkpointed and in fp32 (its
    # gradients and the optimizer state are what is counted, and they do not depend on how it ran)
    model.set_grad_checkpointing(True)
    image, text = _forward(model, cfg, text_length or cfg.data.max_text_length, model.text_vocab_rows)(1)
    ((image @ text.t()).float() * model.logit_scale.exp()).sum().backward()
    optimizer = create_optimizer(model, cfg.train)
    optimizer.step()
    state = sum(t.numel() * t.element_size() for p in model.parameters() for t in (p, p.grad) if t is not None)
    state += sum(v.numel() * v.element_size() for s in optimizer.state.values() for k, v in s.items()
                 if isinstance(v, torch.Tensor) and k != "step")  # the moments (a step count is a scalar)
    return {"params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "state_bytes": state,
            "per_pair_bytes": per_pair, "model": model, "optimizer": optimizer}


def total_bytes(figures: dict, chunk: int, checkpointing: bool, mask_ratio: float, gpus: int = 1) -> float:
    """The memory model's sum for one process: state, `chunk` pairs' activations, DDP's buckets."""
    ddp = 4 * figures["trainable"] if gpus > 1 else 0
    return figures["state_bytes"] + chunk * figures["per_pair_bytes"][pair_key(checkpointing, mask_ratio)] + ddp
