"""`muge bench lora`: LoRA fine-tunes against a full fine-tune from one trained start, the same
epochs, scored on the hard sample's valid split through the ONNX chain.

The start stands in for published weights: the preset (`configs/sample-clip.yaml`, a tiny
Chinese-CLIP) trained from random on the easy sample (`muge sample`, drawn into `--start-data`
when missing) with Chinese-CLIP's own vocabulary (the installed `cn_clip`'s `vocab.txt`, so the
hard sample's words have tokens of their own), and written out as a `transformers` directory
(`muge export --format hf`). `--start` names real Chinese-CLIP weights (hub name or directory)
instead. From the start the preset trains on the hard sample (`muge sample --hard`, drawn into
`--data` when missing) once with every weight trained and once per LoRA setting (the heads and
the multiplier train in both); `--set` lines apply to every fine-tune, `--lora-set` lines to
the LoRA ones. The LoRA settings: one per `--lora RANK`, or with `--sweep` one factor at a time
from a base setting (`SWEEP`: the targets, the rank, the adapters' rate, rsLoRA, DoRA, LoRA+).

Rows: the start as it is, the full fine-tune, each LoRA setting with the share of the full
fine-tune's gain over the start it keeps; what each trained is counted from the AdamW state in
its `last.pt`, whose size is measured. The sweep names the cheapest setting (fewest trained
parameters) within `DEFAULTS_WITHIN` MR of the best LoRA row: the rule `train.lora`'s defaults
follow. Runs and bundles are kept under `--work`, and reused with `--reuse`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import click

from infra.history import run_history

from .runs import export_run, predict_valid, timed_step, train_preset
from .table import emit, in_checkout, prepare_work, table_options

log = logging.getLogger(__name__)
METRICS = ("r1", "r5", "r10", "mean_recall")
# the sweep: one factor at a time from the base (--lora-set, then the first --lora as its rank)
SWEEP = {"targets": [f"train.lora.targets={t}" for t in ("qv", "attention", "all-linear")],
         "rank": [f"train.lora.rank={r}" for r in (4, 8, 16, 32)],
         "lr_ratio": [f"train.lora.lr_ratio={x}" for x in (1, 3, 10, 30)],
         "variant": ["train.lora.use_rslora=true", "train.lora.use_dora=true", "train.lora.b_lr_ratio=16"]}
DEFAULTS_WITHIN = 1.0  # MR points: the defaults are the cheapest setting this close to the best LoRA row


def lora_settings(ranks: tuple[int, ...], lora_overrides: tuple[str, ...], sweep: bool) -> list[list[str]]:
    """Each LoRA fine-tune's `--set` lines: one per rank, or the sweep's (each factor's values
    over the base of `lora_overrides` at the first rank; the base itself once)."""
    if not sweep:
        return [[*lora_overrides, f"train.lora.rank={rank}"] for rank in ranks]
    base = [*lora_overrides, f"train.lora.rank={ranks[0]}"]
    settings = {}
    for values in SWEEP.values():
        for line in values:
            key = line.split("=")[0]
            lines = [x for x in base if x.split("=")[0] != key] + [line]
            settings.setdefault(json.dumps(sorted(lines)), lines)
    return list(settings.values())


def fine_tune_overrides(start: str, overrides: tuple[str, ...], lora: list[str]) -> list[str]:
    """The `--set` lines of a fine-tune from `start` (its tokenizer comes with it), with the LoRA
    lines `lora` ([] or rank 0: every weight trains)."""
    return [f"model.name={start}", "model.text.tokenizer=null", *overrides, *(lora or ["train.lora.rank=0"])]


def run_name(name: str, lines: list[str], defaults: tuple[str, ...]) -> str:
    """`name` (start, full, lora-RANK), with a digest of the settings in `lines` beyond the
    bench's `defaults` where there are any (`--set`, `--lora-set`, the sweep's, `--start`), so
    `--reuse` never takes a run or bundle made another way for this one."""
    extra = [line for line in lines if line not in defaults]
    return f"{name}-{hashlib.sha256(json.dumps(extra).encode()).hexdigest()[:8]}" if extra else name


def check_fine_tunes(config_path: str, overrides: tuple[str, ...], lora_overrides: tuple[str, ...],
                     settings: list[list[str]], start: str | None) -> None:
    """Every fine-tune's config loads and its LoRA targets match layers of the model it trains (the
    `start` weights, or the preset's architecture that the start is trained with), before minutes
    of training."""
    from train.config import ConfigError, load_config
    from train.main import check_lora

    for lines, hint in ((overrides, "--set"), ((*overrides, *lora_overrides), "--lora-set")):
        try:
            cfg = load_config(config_path, list(lines))
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint=f"--config/{hint}") from None
        if cfg.train.lora.rank:
            raise click.BadParameter(f"train.lora.rank={cfg.train.lora.rank}: the bench sets each fine-tune's rank "
                                     f"(--lora RANK); leave train.lora.rank out of {hint}", param_hint=hint)
    try:
        for lora in settings:
            check_lora(load_config(config_path, fine_tune_overrides(start or "null", overrides, lora)))
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--lora-set") from None


def trained_parameters(run_dir: str) -> int:
    """The parameters a run trained: those with AdamW state in its `last.pt` (mapped, not read:
    a full fine-tune's is 12 bytes a parameter)."""
    from model.weights import load_checkpoint

    state = load_checkpoint(os.path.join(run_dir, "last.pt"), mmap=True)["optimizer"]["state"]
    return sum(s["exp_avg"].numel() for s in state.values())


def train_start(config_path: str, start_data: str, run_dir: str, out_dir: str) -> None:
    """Train the preset from random on `start_data` with cn_clip's vocabulary and write the run as
    a `transformers` directory at `out_dir`."""
    from export.formats import export_hf
    from model.cnclip import cn_clip_vocab

    vocab_dir = os.path.dirname(cn_clip_vocab(config_path))
    train_preset(config_path, start_data, run_dir, ["model.name=null", f"model.text.tokenizer={vocab_dir}"])
    export_hf(run_dir, out_dir)


def best_record(run_dir: str):
    """The run's scored epoch of the highest valid MR (PyTorch's scores, from its history)."""
    return max((h for h in run_history(run_dir) if h.scored), key=lambda h: h.mean_recall)


def label_of(lora: list[str], lora_overrides: tuple[str, ...]) -> str:
    """A LoRA row's name: its settings beyond `--lora-set`'s, as `key=value` without `train.lora.`."""
    return "LoRA " + " ".join(line.replace("train.lora.", "").replace("=", " ") for line in lora
                              if line not in lora_overrides)


def add_shares(rows: list[dict]) -> dict | None:
    """Each row's share of the full fine-tune's gain over the start (rows: start, full, LoRA...) and
    its MR against the full fine-tune's; returns the cheapest LoRA row within DEFAULTS_WITHIN of the
    best LoRA row (fewest trained parameters, then time) whose bundle passed the parity gate, or None."""
    start, full = rows[0]["mean_recall"], rows[1]["mean_recall"]
    for row in rows:
        if row.get("mean_recall") is None:  # a fine-tune that diverged
            continue
        row["delta_mr"] = row["mean_recall"] - full
        row["gain_kept"] = (row["mean_recall"] - start) / (full - start) if full != start else None
    lora = [r for r in rows[2:] if r.get("mean_recall") is not None and not r.get("gated")]
    if not lora:
        return None
    best = max(r["mean_recall"] for r in rows[2:] if r.get("mean_recall") is not None)
    close = [r for r in lora if r["mean_recall"] >= best - DEFAULTS_WITHIN]
    return min(close, key=lambda r: (r["trained"], r["train_s"]))


def fine_tune_options(command):
    """The options `bench lora` and `bench loss` share: the samples, the preset, the overrides of
    every fine-tune, the work directory and predict's decode processes."""
    for option in reversed([
        click.option("--data", "data_dir", **in_checkout("data/hard"),
                     help="The fine-tunes' MUGE directory, scored on its valid split; the hard sample is drawn here "
                          "when missing."),
        click.option("--start-data", "start_data", **in_checkout("data/sample"),
                     help="Where the start trains (unless bench lora's --start); the easy sample is drawn here when "
                          "missing."),
        click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
                     **in_checkout("configs/sample-clip.yaml"),
                     help="A Chinese-CLIP preset: the start's model (unless bench lora's --start) and every "
                          "fine-tune's recipe."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a config key of every fine-tune."),
        click.option("--work", "work_dir", **in_checkout("runs/bench-lora"),
                     help="Runs, bundles, submissions and caches (bench lora's and bench loss's: the start is "
                          "shared)."),
        click.option("--workers", type=click.IntRange(min=0), default=None, show_default="CPUs - 1, at least 1",
                     help="Decode processes of each predict."),
        click.option("--reuse", is_flag=True, help="Keep runs and bundles already in --work.")]):
        command = option(command)
    return command


@click.command("lora")
@fine_tune_options
@click.option("--start", help="Chinese-CLIP weights (hub name or directory) to fine-tune from, instead of training "
                              "a start.")
@click.option("--lora", "ranks", multiple=True, type=click.IntRange(min=1), default=(4,), show_default=True,
              metavar="RANK", help="A LoRA fine-tune of this rank (train.lora.rank); repeat for more. With --sweep: "
                                   "the base setting's rank (the first).")
@click.option("--sweep", is_flag=True, help="One factor at a time from the base setting (--lora-set, the first "
              "--lora): targets qv / attention / all-linear, rank 4 / 8 / 16 / 32, the adapters' rate 1 / 3 / 10 / 30 "
              "times the full fine-tune's, rsLoRA, DoRA, LoRA+ (B at 16 times A's rate).")
@click.option("--lora-set", "lora_overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key of the LoRA fine-tunes alone (after --set), e.g. train.lora.lr_ratio=10.")
@table_options
def bench_lora(data_dir, start_data, config_path, start, ranks, sweep, overrides, lora_overrides, work_dir, workers,
               reuse, json_out, csv_out):
    """LoRA against a full fine-tune from one start, the same epochs: valid MR of each."""
    from competition.layout import split_paths
    from competition.sample import EASY, HARD, make_sample
    from export.parity import ParityError
    from infra.gallery import default_workers
    from train.config import load_config
    from train.guard import TrainingDiverged

    workers = default_workers() if workers is None else workers
    settings = lora_settings(tuple(dict.fromkeys(ranks)), lora_overrides, sweep)
    if start:  # before minutes of training: a local path must be there
        from model.tokenizer import TokenizerError, check_local_path

        try:
            check_local_path(start, "the --start weights")
        except TokenizerError as exc:
            raise click.BadParameter(str(exc), param_hint="--start") from None
    check_fine_tunes(config_path, overrides, lora_overrides, settings, start)
    prepare_work(work_dir, [data_dir, start_data, config_path, start])
    for path, kind, difficulty in [(data_dir, "hard", HARD)] + ([] if start else [(start_data, "easy", EASY)]):
        if not os.path.isfile(split_paths(path, "valid")[0]):
            log.info("drawing the %s sample into %s", kind, path)
            make_sample(path, difficulty=difficulty)
    t0 = time.time()
    runs, bundles = os.path.join(work_dir, "runs"), os.path.join(work_dir, "bundles")
    build, trained_start = {"start": 0.0}, os.path.join(work_dir, "start-hf")
    if not start:
        start = trained_start
        build["start"] = timed_step(work_dir, "train-start", os.path.join(start, "config.json"), reuse,
                                    lambda: train_start(config_path, start_data, os.path.join(runs, "start"), start))
    defaults = (f"model.name={trained_start}", "model.text.tokenizer=null")
    fine_tunes = [("full fine-tune", [])] + [(label_of(lora, lora_overrides), lora) for lora in settings]
    names, diverged = {}, {}
    for label, lora in fine_tunes:
        lines = fine_tune_overrides(start, overrides, lora)
        rank = next((line.split("=")[1] for line in lora if line.startswith("train.lora.rank=")), "0")
        name = run_name(f"lora-{rank}" if lora else "full", lines, (*defaults, f"train.lora.rank={rank}"))
        names[label] = name
        try:
            build[name] = timed_step(work_dir, f"train-{name}", os.path.join(runs, name, "best.pt"), reuse,
                                     lambda n=name, x=lines: train_preset(config_path, data_dir, os.path.join(runs, n),
                                                                          x))
        except TrainingDiverged as exc:  # a row of the table, not the end of the sweep
            if not lora:
                raise
            diverged[name] = str(exc).split(";")[0]
    start_name = run_name("start", [f"model.name={start}"], defaults)
    gated, fine_tuned = {}, [(n, os.path.join(runs, n)) for n in names.values() if n not in diverged]
    for name, source in [(start_name, start), *fine_tuned]:
        try:
            timed_step(work_dir, f"export-{name}", os.path.join(bundles, name, "manifest.json"), reuse,
                       lambda s=source, n=name: export_run(s, os.path.join(bundles, n), data_dir))
        except ParityError as exc:  # a fine-tune's bundle refused: its own (PyTorch) valid scores stand in
            if name == start_name:
                raise
            gated[name] = str(exc).split(": ", 1)[1]
    epochs = load_config(config_path, list(overrides)).train.epochs
    rows = [{"run": "the start, not fine-tuned", "train_s": build["start"] or None,
             "note": start if build["start"] else f"{start} (--start)"}]
    for label, name in names.items():
        run_dir = os.path.join(runs, name)
        rows.append({"run": label, "run_dir": name, "note": diverged[name]} if name in diverged else {
            "run": label, "run_dir": name, "trained": trained_parameters(run_dir),
            "best_epoch": best_record(run_dir).epoch, "train_s": build[name],
            "last_pt_mib": os.path.getsize(os.path.join(run_dir, "last.pt")) / 2**20})
    for row, name in zip(rows, [start_name, *names.values()]):
        if name in gated:
            best = best_record(os.path.join(runs, name))
            row.update({k: getattr(best, k) for k in METRICS}, gated=True,
                       note=f"its bundle failed the parity gate ({gated[name]}): PyTorch's valid scores")
        elif name not in diverged:
            summary = predict_valid([os.path.join(bundles, name)], data_dir, work_dir, name, workers)
            row.update({k: summary[k] for k in METRICS})
    chosen = add_shares(rows)
    columns = ("run", *METRICS, "delta_mr", "gain_kept", "trained", "last_pt_mib", "best_epoch", "train_s", "run_dir",
               "note")
    rule = [f"the cheapest LoRA setting (fewest trained parameters) within {DEFAULTS_WITHIN:g} MR of the best LoRA "
            f"row: {chosen['run']} (MR {chosen['mean_recall']:.2f}, {chosen['gain_kept']:.0%} of the full fine-tune's "
            "gain)"] if chosen and chosen["gain_kept"] is not None else []
    emit([{k: r.get(k) for k in columns} for r in rows],
         title=f"muge bench lora: {config_path}, {epochs} epochs on {data_dir} from one start; valid MR through the "
               "ONNX chain; delta_mr against the full fine-tune, gain_kept its share of the full fine-tune's gain",
         json_out=json_out, csv_out=csv_out,
         extra={"data": data_dir, "start": start, "epochs": epochs, "overrides": list(overrides),
                "lora_overrides": list(lora_overrides), "sweep": sweep, "chosen": chosen and chosen["run"]},
         notes=[*rule, f"(bench lora in {time.time() - t0:.0f}s; runs and bundles in {work_dir})"])
