"""`muge plan`: the settings that fit a preset's training on a card, from the training memory model
(`train.memory`), as one `--set` line and the arithmetic behind it.

The figures are measured at each preset's published shape by `muge bench scale --stage memory`
(`make bench-scale` writes `MEMORY_MODEL`, shipped with the package, with the date, commit and
machine): the state of a full fine-tune and of LoRA at `LORA_RANK`, and the bytes held per pair with
and without gradient checkpointing, unmasked and with FLIP masking. A plan keeps the preset's global
batch (the recipe's: Chinese-CLIP's small-batch fine-tunes fall short of its zero-shot score;
`--global-batch` asks for another, and a smaller one is noted) and splits it over the GPUs; a
setting fits when the memory model's total, a gradient-cache chunk of the per-GPU batch at a time,
stays within the card less a margin for what a CPU cannot measure (`MARGIN_GIB` and `MARGIN_SHARE`
of the card: the allocator, workspaces, the attention kernel). It prefers, in this order: a full
fine-tune, then LoRA; within each, no checkpointing, then checkpointing; FLIP masking only when
nothing fits without it (its effect on MeanRecall is not measured here); and the largest chunk that
fits (no gradient cache where the whole per-GPU batch does). A card too small for every setting is
an error naming the smallest that fits.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

from .memory import FLIP_RATIO, GIB, MIB, pair_key, total_bytes

MEMORY_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_model.json")
MARGIN_GIB, MARGIN_SHARE = 1.0, 0.10  # kept free of the memory model's total: 1 GiB and a tenth of the card
MIN_CHUNK = 16  # pairs a chunk holds at least: smaller chunks leave a GPU idle
LORA_RANK = 4  # the rank a plan trains LoRA at (`train.lora.rank`; its other settings are the defaults)
# full before LoRA, no FLIP before FLIP, no checkpointing before checkpointing
CANDIDATES = [(mode, mask, checkpointing) for mask in (0.0, FLIP_RATIO) for mode in ("full", "lora")
              for checkpointing in (False, True)]


class PlanError(ValueError):
    """No setting fits, or the memory model lacks the preset: the message says what does."""


@dataclass
class Plan:
    preset: str
    gpu_memory_gib: float
    gpus: int
    mode: str                # full | lora
    checkpointing: bool
    mask_ratio: float
    global_batch: int
    per_gpu_batch: int
    chunk: int               # pairs held at once: the per-GPU batch, or a gradient-cache chunk of it
    state_gib: float
    per_pair_mib: float
    ddp_gib: float
    total_gib: float
    budget_gib: float        # the card less the margin
    notes: list[str] = field(default_factory=list)

    def sets(self) -> list[str]:
        lines = [f"train.batch_size={self.per_gpu_batch}",
                 f"train.grad_cache_chunk={self.chunk if self.chunk < self.per_gpu_batch else 'null'}",
                 f"model.grad_checkpointing={'true' if self.checkpointing else 'false'}",
                 f"train.mask_ratio={self.mask_ratio:g}", f"train.lora.rank={LORA_RANK if self.mode == 'lora' else 0}"]
        return lines

    def set_line(self) -> str:
        return " ".join(f"--set {line}" for line in self.sets())

    def arithmetic(self) -> str:
        ddp = f" + DDP buckets {self.ddp_gib:.2f} GiB" if self.ddp_gib else ""
        return (f"state {self.state_gib:.2f} GiB + {self.chunk} pairs x {self.per_pair_mib:.1f} MiB{ddp} = "
                f"{self.total_gib:.2f} GiB, within {self.budget_gib:.2f} GiB (the card's {self.gpu_memory_gib:g} GiB "
                f"less {MARGIN_GIB:g} GiB and {MARGIN_SHARE:.0%}: allocator, workspaces, the attention kernel)")

    def to_dict(self) -> dict:
        return {**asdict(self), "sets": self.sets(), "set_line": self.set_line(), "arithmetic": self.arithmetic()}


def read_memory_model(path: str = MEMORY_MODEL) -> dict:
    """The memory model's figures; a PlanError naming the file where it is missing or not one."""
    try:
        with open(path, encoding="utf-8") as f:
            model = json.load(f)
    except FileNotFoundError:
        raise PlanError(f"{path}: no memory model here; `make bench-scale` measures one") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path}: not a memory model ({exc}); `make bench-scale` measures one") from None
    if not isinstance(model, dict) or not isinstance(model.get("presets"), dict):
        raise PlanError(f"{path}: not a memory model (no presets); `make bench-scale` measures one")
    return model


def budget(gpu_memory_gib: float) -> float:
    return gpu_memory_gib * (1 - MARGIN_SHARE) - MARGIN_GIB


def _largest_chunk(figures: dict, per_gpu: int, checkpointing: bool, mask: float, gpus: int, room: float) -> int:
    """The largest divisor of `per_gpu` whose total fits in `room` bytes (at least MIN_CHUNK, or the
    whole batch where it is smaller), or 0."""
    sizes = sorted((c for c in range(1, per_gpu + 1) if per_gpu % c == 0 and c >= min(MIN_CHUNK, per_gpu)),
                   reverse=True)
    return next((c for c in sizes if total_bytes(figures, c, checkpointing, mask, gpus) <= room), 0)


def make_plan(preset: str, entry: dict, gpu_memory_gib: float, gpus: int = 1, global_batch: int | None = None) -> Plan:
    """The first setting of `CANDIDATES` that fits the card (`entry`: the memory model's figures of
    `preset`) at `global_batch` (default: the preset's), or a PlanError naming the smallest card
    that fits."""
    recipe = int(entry["batch_size"])
    global_batch = global_batch or recipe
    per_gpu = math.ceil(global_batch / gpus)
    notes = [] if global_batch >= recipe else [
        f"a global batch of {global_batch}, below the recipe's {recipe}, as asked: every pair's negatives are the "
        "rest of the batch, so a smaller one gives a weaker contrastive signal (Chinese-CLIP's #396: batch 128 on one "
        "card fine-tuned below the zero-shot score)"]
    if per_gpu * gpus != global_batch:
        notes.append(f"the global batch of {global_batch} does not split over {gpus} GPUs: {per_gpu} a GPU makes it "
                     f"{per_gpu * gpus} (never less than asked)")
    room = budget(gpu_memory_gib) * GIB
    for mode, mask, checkpointing in CANDIDATES:
        figures = _runs(entry, preset)[mode]
        if pair_key(checkpointing, mask) not in figures["per_pair_bytes"]:
            continue
        chunk = _largest_chunk(figures, per_gpu, checkpointing, mask, gpus, room)
        if chunk:
            return _plan_of(preset, figures, gpu_memory_gib, gpus, mode, checkpointing, mask, global_batch, per_gpu,
                            chunk, notes)
    raise PlanError(f"{preset} does not fit a {gpu_memory_gib:g} GiB card at a global batch of {global_batch} on "
                    f"{gpus} GPU(s), whatever the setting (LoRA rank {LORA_RANK}, checkpointing, FLIP, chunks of "
                    f"{MIN_CHUNK}): the smallest card that fits has "
                    f"{math.ceil(smallest_card(preset, entry, gpus, global_batch) * 10) / 10:g} GiB")


def smallest_card(preset: str, entry: dict, gpus: int = 1, global_batch: int | None = None) -> float:
    """The GiB a card needs for the leanest setting (LoRA, checkpointing, FLIP where measured, the
    smallest chunk), margin included."""
    per_gpu = math.ceil((global_batch or int(entry["batch_size"])) / gpus)
    chunk = min(c for c in range(1, per_gpu + 1) if per_gpu % c == 0 and c >= min(MIN_CHUNK, per_gpu))
    need = min(total_bytes(_runs(entry, preset)[mode], chunk, checkpointing, mask, gpus)
               for mode, mask, checkpointing in CANDIDATES
               if pair_key(checkpointing, mask) in _runs(entry, preset)[mode]["per_pair_bytes"])
    return (need / GIB + MARGIN_GIB) / (1 - MARGIN_SHARE)


def _runs(entry: dict, preset: str) -> dict:
    runs = entry.get("runs", {})
    if "0" not in runs or str(LORA_RANK) not in runs:
        raise PlanError(f"the memory model has no full fine-tune or LoRA rank {LORA_RANK} figures for {preset}: "
                        f"measure them with `muge bench scale --preset {preset} --stage memory --lora 0 --lora "
                        f"{LORA_RANK} --memory-model {MEMORY_MODEL}`")
    return {"full": runs["0"], "lora": runs[str(LORA_RANK)]}


def _plan_of(preset, figures, gpu_memory_gib, gpus, mode, checkpointing, mask, global_batch, per_gpu, chunk,
             notes) -> Plan:
    pair = figures["per_pair_bytes"][pair_key(checkpointing, mask)]
    ddp = 4 * figures["trainable"] if gpus > 1 else 0
    if mask:
        notes.append(f"FLIP masking ({mask:g}) only because nothing fits without it: its effect on MeanRecall is not "
                     "measured in this project")
    if mode == "lora":
        notes.append("LoRA because a full fine-tune does not fit; its share of a full fine-tune's gain: "
                     "docs/benchmarks.md")
    return Plan(preset, gpu_memory_gib, gpus, mode, checkpointing, mask, global_batch, per_gpu, chunk,
                figures["state_bytes"] / GIB, pair / MIB, ddp / GIB,
                total_bytes(figures, chunk, checkpointing, mask, gpus) / GIB, budget(gpu_memory_gib), notes)


def render(plan: Plan, config_path: str) -> str:
    """What `muge plan` prints: the command line, then why."""
    mode = f"LoRA rank {LORA_RANK}" if plan.mode == "lora" else "a full fine-tune"
    cache = (f"a gradient cache of {plan.chunk}-pair chunks" if plan.chunk < plan.per_gpu_batch
             else "the whole per-GPU batch at once")
    flip = f"at {plan.mask_ratio:g}" if plan.mask_ratio else "off"
    return "\n".join([
        f"muge train --config {config_path} {plan.set_line()}",
        f"{plan.preset} on {plan.gpus} x {plan.gpu_memory_gib:g} GiB: {mode}, {plan.per_gpu_batch} pairs a GPU "
        f"(a global batch of {plan.global_batch}), {cache}, checkpointing "
        f"{'on' if plan.checkpointing else 'off'}, FLIP {flip}", f"memory: {plan.arithmetic()}", *plan.notes])
