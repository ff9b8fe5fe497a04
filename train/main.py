"""The training run: `train_run(cfg, data_dir, out_dir)` fine-tunes, evaluates on valid every epoch,
and keeps `best.pt` (by MeanRecall), `last.pt` (resumable), `metrics.jsonl`, `curves.png` and
`config.yaml` in the run directory. Launch under torchrun for DDP.

`build_training` makes everything one process trains with (the run and `muge bench train` both
use it); `train_run` adds the run directory: set-up, resume, then the epoch loop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from competition.layout import split_files
from competition.preprocess import TOKENIZER_DIR, TextTokenizer
from infra.history import HISTORY, write_history
from infra.outputs import MARKER, OutputError, OutputKind, check_output, write_marker
from model.config import read_lora
from model.factory import FAMILIES, Resume, create_model, start_file_gone
from model.family import RetrievalModel
from model.lora import LoraSettingError, merged_state_dict, plan_lora
from model.tokenizer import check_tokenizer, prepare_tokenizer
from model.weights import CheckpointError, load_checkpoint

from .checkpoint import match_param_layout, rng_state, save_checkpoint, set_rng_state
from .config import Config, ConfigError, data_seed, mask_ratio_at, save_config, to_dict
from .curves import plot_curves
from .data import PairDataset, stop_workers, train_loader
from .distributed import World, barrier, cleanup, device_for, init_distributed
from .ema import ModelEma
from .evaluate import EvalSettings, check_gallery, evaluate
from .guard import DivergenceGuard, divergence_advice
from .loop import train_one_epoch
from .loss import ClipLoss
from .optim import apply_freeze, create_optimizer
from .precision import grad_scaler, resolve_precision
from .scheduler import create_scheduler
from .speed import compile_enabled, configure_backends, optimize_model
from .step import StepParts
from .tracking import Tracker

log = logging.getLogger(__name__)
RESUME_KEYS = {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "history", "best"}


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Training:
    """What one training process trains with, built from a config by `build_training`."""

    cfg: Config
    world: World
    device: torch.device
    precision: str
    compiled: bool
    tokenizer: TextTokenizer
    model: RetrievalModel
    arch: dict
    dataset: PairDataset
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: ClipLoss
    ema: ModelEma | None
    trainable: dict  # trainable parameter counts per group after epoch 0's freezing
    guard: DivergenceGuard

    def step_parts(self, epoch: int = 0) -> StepParts:
        train = self.cfg.train
        return StepParts(self.criterion, self.optimizer, self.scheduler, self.scaler, self.precision, self.device,
                         self.guard, train.grad_clip, train.grad_cache_chunk, self.ema, train.log_every, epoch,
                         divergence_advice(vars(train.lr), train.grad_clip, self.precision))

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.loader), self.cfg.train.accum_steps)


def steps_per_epoch(batches: int, accum_steps: int) -> int:
    """Optimizer steps in an epoch of `batches`: a short last group is stepped too."""
    return -(-batches // accum_steps)


def build_training(cfg: Config, train_files: tuple[str, str], run_dir: str, world: World | None = None, *,
                   total_steps: int | None = None, defer_compile: bool = False,
                   resume: Resume | None = None) -> Training:
    """Model (seeded by `train.seed`; `model.factory.create_model`, with `train.lora`'s adapters and
    a `resume`d run's weights), tokenizer (written to `run_dir/tokenizer/` by rank 0 first), pairs
    and loader, optimizer, schedule over `total_steps` (default: the config's epochs), gradient
    scaler, loss and EMA, on this process's device. `defer_compile`: build for a compiled model
    (static text shapes) but leave compiling it to the caller."""
    world = world or World()
    device = device_for(world)
    precision = resolve_precision(cfg.train.precision, device)
    compiled = compile_enabled(cfg.train.compile, device)
    configure_backends(device)
    seed_everything(cfg.train.seed)
    train_queries, train_tsv = train_files
    source = FAMILIES[cfg.model.family].tokenizer_source(cfg.model)

    def tokenizer_now():
        return prepare_tokenizer(cfg.model.text.tokenizer, source, train_queries, run_dir,
                                 cfg.data.max_text_length, cfg.data.text_normalization)

    tokenizer = tokenizer_now() if world.main else None
    barrier()  # rank 0 wrote it; the others read it
    tokenizer = tokenizer or tokenizer_now()
    try:
        model, arch = create_model(cfg.model, tokenizer.vocab_size, cfg.train.lora, resume)
    except LoraSettingError as exc:
        raise ConfigError(str(exc)) from None
    for key, instead in model.ignored_settings(cfg.model).items() if world.main else ():
        log.warning("%s is set, but the %s family does not read it (%s): it is ignored", key, model.family, instead)
    try:  # a CNN tower with a ratio > 0 anywhere in the schedule is refused now, not at that epoch
        model.set_mask_ratio(max(mask_ratio_at(cfg.train, e) for e in range(cfg.train.epochs)))
        model.set_mask_ratio(mask_ratio_at(cfg.train, 0))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.train.loss == "sigmoid" and cfg.train.sigmoid_scale_init and resume is None:  # SigLIP's start
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.train.sigmoid_scale_init))
    model.clamp_logit_scale()  # the multiplier starts inside the range training keeps it in
    own_size = model.image_size  # a ViT's is fixed by its position embedding
    if own_size is not None and own_size != cfg.data.image_size:
        raise ConfigError(f"data.image_size={cfg.data.image_size}, but the model's vision tower takes {own_size} px "
                          f"images ({cfg.model.name or 'model.config'}): set data.image_size={own_size}")
    # before the optimizer: its state takes the parameters' memory layout
    optimize_model(model.to(device), device, compiled and not defer_compile)
    dataset = PairDataset(train_queries, train_tsv, cfg)
    check_tokenizer(tokenizer, model.text_vocab_rows, dataset.texts(2000), os.path.join(run_dir, "tokenizer"),
                    exact=model.exact_vocabulary)
    loader = train_loader(dataset, tokenizer, cfg, world.rank, world.size, device,
                          pad_to=cfg.data.max_text_length if compiled else None)
    trainable = apply_freeze(model, cfg.train.freeze, 0)
    criterion = ClipLoss(cfg.train.label_smoothing, cfg.train.hard_negative_margin, cfg.train.hard_negative_weight,
                         cfg.train.loss, cfg.train.sigmoid_bias_init).to(device)
    optimizer = create_optimizer(model, cfg.train, criterion)
    total_steps = total_steps or steps_per_epoch(len(loader), cfg.train.accum_steps) * cfg.train.epochs
    scheduler = create_scheduler(optimizer, cfg.train.warmup_steps, total_steps, cfg.train.min_lr_ratio)
    ema = ModelEma(model, cfg.train.ema) if cfg.train.ema else None
    return Training(cfg, world, device, precision, compiled, tokenizer, model, arch, dataset, loader, optimizer,
                    scheduler, grad_scaler(precision, device), criterion, ema, trainable,
                    DivergenceGuard(cfg.train.max_skipped_steps, device))


def check_lora(cfg: Config, model: RetrievalModel | None = None) -> None:
    """`cfg.train.lora` checked against `model` (default: the config's own, built for the check:
    random towers are built from their config, named weights loaded) before any training, so a
    bench or a run refuses a target that matches nothing, naming the key."""
    if not cfg.train.lora.rank:
        return
    model = model or create_model(cfg.model)[0]
    try:
        plan_lora(model, cfg.train.lora)
    except LoraSettingError as exc:
        raise ConfigError(str(exc)) from None


@dataclass
class RunState:
    """Where a run stands: saved in `last.pt`, restored by `--resume`."""

    epoch: int = 0                # epochs completed
    step: int = 0                 # optimizer steps taken
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"mean_recall": -1.0})


def wrap_ddp(model, world: World, device):
    """DDP over the parameters that train now: build it again whenever freezing changes them (a
    DDP reducer only ever syncs the parameters that required grad when it was built)."""
    if world.size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=False)


CHECKPOINTS = ("best.pt", "last.pt")
# what a run directory holds: an earlier run at --out is replaced by these names alone (--overwrite)
RUN_FILES = (*CHECKPOINTS, HISTORY, "curves.png", "config.yaml", TOKENIZER_DIR, "tensorboard", MARKER)


def _holds_checkpoints(path: str) -> bool:
    """A run directory written before the output marker: it holds a checkpoint."""
    return any(os.path.isfile(os.path.join(path, name)) for name in CHECKPOINTS)


RUN = OutputKind("run", recognise=_holds_checkpoints)


def run_sources(cfg: Config, data_dir: str) -> list[str | None]:
    """What a run reads on disk, which its --out must never replace or hold: the data, and any
    weights, tokenizer or checkpoint the config names by a local path."""
    m = cfg.model
    return [data_dir, m.name, m.text.name, m.text.tokenizer, m.image.checkpoint]


def check_run_dir(out_dir: str, sources, overwrite: bool = False) -> list[str]:
    """Refuse `out_dir` for a new run unless it is new, empty, or a run (`infra.outputs`); a run
    that holds checkpoints is refused too, unless `overwrite`. Returns the checkpoints it holds."""
    check_output(out_dir, RUN, sources)
    held = [name for name in CHECKPOINTS if os.path.isfile(os.path.join(out_dir, name))]
    if held and not overwrite:
        raise OutputError(f"--out {out_dir} holds a run ({', '.join(held)}): nothing was changed; --resume {out_dir} "
                          "to continue it, or another --out (--overwrite replaces it)")
    return held


def train_run(cfg: Config, data_dir: str, out_dir: str, resume: bool = False, overwrite: bool = False,
              sources=()) -> dict:
    """Train per `cfg`; returns the best epoch's metrics. A new run's `out_dir` must be new, empty
    or an earlier run (replaced with `overwrite`), and never hold or lie inside what it reads (the
    data, the config's local weights, `sources`). A run directory this call created is removed
    again if training fails before its first checkpoint: a bad input leaves nothing behind."""
    world = init_distributed()
    created = not os.path.exists(out_dir)
    try:
        held = [] if resume else check_run_dir(out_dir, [*run_sources(cfg, data_dir), *sources], overwrite)
        return _build_and_train(cfg, data_dir, out_dir, resume, world, replace=bool(held))
    except BaseException:
        if world.main and created and not os.path.exists(os.path.join(out_dir, "last.pt")):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        cleanup()


def _build_and_train(cfg: Config, data_dir: str, out_dir: str, resume: bool, world: World, replace: bool) -> dict:
    train_files, valid_files = split_files(data_dir, "train"), split_files(data_dir, "valid")  # inputs first
    last = os.path.join(out_dir, "last.pt")
    ckpt = resumable_checkpoint(last) if resume else None  # refused before any work
    resuming = resume_from(cfg, ckpt, last) if ckpt else None
    if world.main:
        if replace:  # --overwrite: the earlier run's files go, once the inputs are known to be there
            log.warning("--overwrite: removing the run in %s (%s)", out_dir, ", ".join(CHECKPOINTS))
            _remove_run_files(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        write_marker(out_dir, RUN)
    barrier()
    training = build_training(cfg, train_files, out_dir, world, resume=resuming)
    try:
        return _train_and_report(training, cfg, valid_files, out_dir, resume, ckpt)
    finally:
        stop_workers(training.loader)


def _remove_run_files(out_dir: str) -> None:
    for name in RUN_FILES:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _train_and_report(training: Training, cfg: Config, valid_files, out_dir: str, resume: bool,
                      ckpt: dict | None) -> dict:
    world = training.world
    if world.main and not cfg.eval.untrained and not cfg.data.skip_bad_images:
        # every valid image decodes, or the run stops now rather than after its first epoch
        check_gallery(valid_files[1], EvalSettings.of_run(cfg, training.device, training.precision))
    barrier()
    if ckpt is not None:
        state = restore(training, ckpt, os.path.join(out_dir, "last.pt"))
        if world.main:
            log.info("resuming %s after epoch %d (step %d)", out_dir, state.epoch, state.step)
    else:
        state = RunState()
        if world.main:
            save_config(cfg, os.path.join(out_dir, "config.yaml"))
    if world.main:
        log.info("%s model, %.1fM parameters, %s%s on %s x%d; %d pairs, %d steps/epoch, %d epochs",
                 cfg.model.family, sum(p.numel() for p in training.model.parameters()) / 1e6, training.precision,
                 ", compiled" if training.compiled else "", training.device.type, world.size, len(training.dataset),
                 training.steps_per_epoch, cfg.train.epochs)
    tracker = Tracker(out_dir if cfg.train.tensorboard and world.main else None)
    if not resume and cfg.eval.untrained and world.main:
        record = score_epoch(training, valid_files, epoch=0, step=0, train_loss=None, samples_per_s=None)
        state.history.append(record)
        tracker.epoch(record)
        log.info("untrained model: MR %.2f", record["mean_recall"])
        if starts_pretrained(cfg):  # a fine-tune never ends worse than where it started
            save_best(training, state, {**record, "weights": "start"}, out_dir)
    barrier()
    try:
        train_epochs(training, state, valid_files, out_dir, tracker)
    finally:
        tracker.close()
    if world.main:
        untrained = next((h for h in state.history if h["epoch"] == 0), None)
        held = {"ema": "the EMA of the weights", "start": "the pretrained start, untrained"}.get(
            state.best.get("weights"), "the trained weights")
        msg = f"best valid MR {state.best['mean_recall']:.2f} at epoch {state.best.get('epoch')}: best.pt holds {held}"
        if untrained:
            msg += f" (untrained MR {untrained['mean_recall']:.2f})"
        log.info("%s; run in %s", msg, out_dir)
    return state.best


def starts_pretrained(cfg: Config) -> bool:
    """Whether training starts from pretrained weights (any tower), rather than a random start."""
    return FAMILIES[cfg.model.family].starts_from_weights(cfg.model)


def resumable_checkpoint(path: str) -> dict:
    ckpt = load_checkpoint(path)
    if not RESUME_KEYS <= ckpt.keys():
        raise CheckpointError(f"{path}: cannot resume from it: it lacks {', '.join(sorted(RESUME_KEYS - ckpt.keys()))}")
    return ckpt


def resume_from(cfg: Config, ckpt: dict, path: str) -> Resume:
    """What the model is resumed from (`model.factory.create_model` loads its weights), checked
    before any work: LoRA settings must be the run's own, and a model section edited since is
    named where the weights do not fit (refused outright where the start file is gone too)."""
    _check_resumed_lora(ckpt["config"], cfg, path)
    saved, now = ckpt["config"].get("model", {}), to_dict(cfg)["model"]
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if [k for k in changed if k != "name"] and start_file_gone(cfg.model.name):  # rebuilt from last.pt
        raise CheckpointError(f"{path}: config.yaml's model section was edited since ({', '.join(changed)} differ), "
                              "and the run's start file is gone: resume with the model it was trained with")
    return Resume(ckpt, path, f"; config.yaml's model section was edited since ({', '.join(changed)} differ)"
                  if changed else "")


def restore(training: Training, ckpt: dict, path: str) -> RunState:
    """Load `last.pt`'s optimizer, schedule, scaler, RNG and EMA into `training` (its model came
    with the weights, `resume_from`). The optimizer's settings and the schedule are config.yaml's
    as it is now: new rates, epochs or warmup take effect from the resumed step, logged."""
    fresh = [{k: v for k, v in g.items() if k in GROUP_SETTINGS} for g in training.optimizer.param_groups]
    try:
        training.optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: its optimizer state does not fit the parameter groups config.yaml makes now "
                              f"({exc}); the train section was edited since") from None
    match_param_layout(training.optimizer)
    _schedule_from_config(training, fresh, ckpt, path)
    training.scaler.load_state_dict(ckpt["scaler"])
    if ckpt.get("loss"):  # the sigmoid loss's bias
        training.criterion.load_state_dict(ckpt["loss"])
    set_rng_state(ckpt["rng"])
    if training.ema is not None and "ema" in ckpt:
        training.ema.load_state_dict(ckpt["ema"])
    elif training.ema is not None and training.world.main:
        log.warning("%s holds no EMA of the weights: the average starts from the resumed weights", path)
    elif "ema" in ckpt and training.world.main:
        log.warning("%s holds an EMA of the weights, but config.yaml no longer sets train.ema: it is dropped from "
                    "here on (set train.ema again to keep it)", path)
    return RunState(ckpt["epoch"], ckpt["step"], ckpt["history"], ckpt["best"])


GROUP_SETTINGS = ("initial_lr", "weight_decay", "betas", "eps", "lr_scale")  # of an AdamW group, from config.yaml
SCHEDULE_KEYS = ("lr", "layer_decay", "weight_decay", "betas", "eps", "warmup_steps", "min_lr_ratio", "epochs",
                 "batch_size", "accum_steps")  # the train keys that shape the optimizer's groups and the schedule


def _check_resumed_lora(saved: dict, cfg: Config, path: str) -> None:
    """A run resumes with its own adapters: `train.lora` as it was trained, or a clear refusal."""
    was, now = read_lora(saved, path), cfg.train.lora
    changed = [f.name for f in dataclasses.fields(now) if getattr(was, f.name) != getattr(now, f.name)]
    if changed:
        shown = ", ".join(f"train.lora.{k}={getattr(was, k)!r} (now {getattr(now, k)!r})" for k in changed)
        raise CheckpointError(f"{path}: the run was trained with {shown}: its last.pt holds the weights and optimizer "
                              "state of those settings; resume with them, or start a new run (--out) for others")


def _schedule_from_config(training: Training, fresh: list[dict], ckpt: dict, path: str) -> None:
    """The restored optimizer takes config.yaml's group settings (`fresh`: its rates, weight decay,
    betas, eps) and the schedule resumes at the saved step on config.yaml's curve (its rates,
    warmup, floor and length): a resume with the same config restores every rate exactly; one
    with new values follows them from here, said in the log."""
    for group, settings in zip(training.optimizer.param_groups, fresh):
        group.update(settings)
    scheduler = training.scheduler
    step = int(ckpt["scheduler"]["last_epoch"])
    rates = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    scheduler.load_state_dict({**ckpt["scheduler"], "base_lrs": list(scheduler.base_lrs), "_last_lr": rates})
    for group, rate in zip(training.optimizer.param_groups, rates):
        group["lr"] = rate
    was, now = ckpt["config"].get("train", {}), to_dict(training.cfg)["train"]
    changed = [f"train.{k} {was.get(k)!r} -> {now[k]!r}" for k in SCHEDULE_KEYS if was.get(k) != now[k]]
    if changed and training.world.main:
        log.info("resuming %s with %s: the optimizer's groups and the schedule follow the new values from step %d",
                 path, ", ".join(changed), step)


def valid_scores(training: Training, valid_files: tuple[str, str], label: str = "valid") -> dict:
    settings = EvalSettings.of_run(training.cfg, training.device, training.precision)
    return evaluate(training.model, training.tokenizer, *valid_files, settings, label=label).as_dict()


def score_epoch(training: Training, valid_files, *, epoch: int, step: int, train_loss, samples_per_s) -> dict:
    """The epoch's record for metrics.jsonl: its training figures, valid scores and the EMA's."""
    record = {"epoch": epoch, "step": step, "train_loss": train_loss, "samples_per_s": samples_per_s,
              **valid_scores(training, valid_files)}
    if training.ema is not None and epoch > 0:
        with training.ema.applied(training.model):
            record["ema"] = valid_scores(training, valid_files, "valid (EMA)")
    return record


def best_candidate(record: dict) -> dict:
    """An epoch's record as a best.pt candidate: the trained weights' scores, or the EMA's where
    they are higher (then `weights: ema`, and best.pt holds the EMA)."""
    averaged = record.get("ema")
    if averaged and averaged["mean_recall"] > record.get("mean_recall", -1):
        return {**{k: v for k, v in record.items() if k != "ema"}, **averaged, "weights": "ema"}
    return record


def train_epochs(training: Training, state: RunState, valid_files, out_dir: str, tracker: Tracker) -> None:
    """The epochs from `state.epoch` on: train, score valid, keep best.pt and last.pt."""
    cfg, world = training.cfg, training.world
    ddp, trainable = None, training.trainable
    for epoch in range(state.epoch, cfg.train.epochs):
        now = apply_freeze(training.model, cfg.train.freeze, epoch)
        training.model.set_mask_ratio(mask_ratio_at(cfg.train, epoch))
        if ddp is None or now != trainable:
            ddp, trainable = wrap_ddp(training.model, world, training.device), now
        seed_everything(data_seed(cfg.train) * 1000 + epoch)  # dropout etc.: a function of (seed, epoch) alone
        training.loader.sampler.set_epoch(epoch)
        if training.compiled and epoch == state.epoch and world.main:
            log.info("the first batch compiles the model (torch.compile): a minute or more, once")
        stats = train_one_epoch(training, ddp, epoch, state.step, tracker=tracker)
        parts = training.step_parts(epoch)
        parts.guard.check_epoch(stats.step - state.step, stats.skipped_steps, parts.optimizer, epoch, parts.advice)
        state.epoch, state.step = epoch + 1, stats.step
        if world.main:
            if state.epoch % cfg.eval.every_epochs == 0 or state.epoch == cfg.train.epochs:
                record = score_epoch(training, valid_files, epoch=state.epoch, step=state.step, train_loss=stats.loss,
                                     samples_per_s=stats.steady_samples_per_s)
            else:
                record = {"epoch": state.epoch, "step": state.step, "train_loss": stats.loss,
                          "samples_per_s": stats.steady_samples_per_s}
            state.history.append(record)
            tracker.epoch(record)
            save_epoch(training, state, best_candidate(record), out_dir)
        barrier()


def save_best(training: Training, state: RunState, candidate: dict, out_dir: str) -> None:
    """best.pt, when `candidate` (an epoch's scores, `weights` saying which) beats the best until now."""
    if candidate.get("mean_recall", -1) > state.best["mean_recall"]:
        state.best = candidate
        ema = candidate.get("weights") == "ema"
        with training.ema.applied(training.model) if ema else contextlib.nullcontext():
            save_checkpoint(os.path.join(out_dir, "best.pt"), {  # with LoRA, the adapters merged: a plain model
                "model": merged_state_dict(training.model), "arch": training.arch, "config": to_dict(training.cfg),
                "epoch": state.epoch, "metrics": candidate})


def save_epoch(training: Training, state: RunState, candidate: dict, out_dir: str) -> None:
    """best.pt when `candidate` beats the best until now, then last.pt, metrics.jsonl, curves.png."""
    common = {"arch": training.arch, "config": to_dict(training.cfg), "epoch": state.epoch}
    save_best(training, state, candidate, out_dir)
    save_checkpoint(os.path.join(out_dir, "last.pt"), {
        "model": training.model.state_dict(), **common, "optimizer": training.optimizer.state_dict(),
        "loss": training.criterion.state_dict(),
        "scheduler": training.scheduler.state_dict(), "scaler": training.scaler.state_dict(), "rng": rng_state(),
        "step": state.step, "history": state.history, "best": state.best,
        **({"ema": training.ema.state_dict()} if training.ema is not None else {})})
    write_history(os.path.join(out_dir, HISTORY), state.history)
    plot_curves(state.history, os.path.join(out_dir, "curves.png"))
