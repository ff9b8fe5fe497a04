"""`muge train`: fine-tune from a YAML preset with dotted overrides, or resume a run."""
from __future__ import annotations

import os

import click


@click.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="A preset from configs/ (ignored with --resume: the run's own config.yaml is used).")
@click.option("--data", "data_dir", default="data/sample", show_default=True, type=click.Path(file_okay=False),
              help="Directory holding the MUGE files.")
@click.option("--out", "out_dir", type=click.Path(), help="Run directory (default runs/<preset>): a new or empty "
              "one; an earlier run there is refused unless --overwrite.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. train.epochs=5.")
@click.option("--resume", "resume_dir", type=click.Path(exists=True, file_okay=False),
              help="Continue the run in this directory from its last.pt.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier run at --out (its checkpoints, metrics and "
              "config) instead of refusing it; never a directory the run did not write.")
def train(config_path, data_dir, out_dir, overrides, resume_dir, overwrite):
    """Fine-tune a preset's model (a BERT + timm dual encoder, or Chinese-CLIP) on MUGE train; score valid every
    epoch."""
    from competition import MugeDataError
    from model.weights import CheckpointError

    from .config import ConfigError, load_config
    from .distributed import DistributedSetupError
    from .guard import TrainingDiverged
    from .main import train_run

    if resume_dir:
        config_path, out_dir = os.path.join(resume_dir, "config.yaml"), resume_dir
        if not os.path.isfile(config_path):
            raise click.ClickException(f"{config_path} not found: {resume_dir} is not a run directory") from None
    if not config_path:
        raise click.UsageError("give --config configs/NAME.yaml (or --resume RUN_DIR)")
    if resume_dir and overwrite:
        raise click.UsageError("--overwrite replaces a run and --resume continues it: give one of them")
    out_dir = out_dir or os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])
    try:
        cfg = load_config(config_path, list(overrides))
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--config/--set") from None
    try:
        best = train_run(cfg, data_dir, out_dir, resume=bool(resume_dir), overwrite=overwrite, sources=(config_path,))
    except (MugeDataError, CheckpointError, DistributedSetupError, TrainingDiverged, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"best valid MR {best['mean_recall']:.2f}; checkpoint {os.path.join(out_dir, 'best.pt')}")


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(), help="The soup's run directory to write (a new "
              "one, or an earlier soup: replaced).")
@click.option("--checkpoint", default="best", show_default=True, help="best | last: which checkpoint of each run.")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False),
              help="Score the soup on this MUGE directory's valid split (recorded in best.pt).")
@click.option("--overwrite", is_flag=True, help="Replace what is at --out even if muge average did not write it "
              "(never one of the runs, or a directory holding one).")
def average(run_dirs, out_dir, checkpoint, data_dir, overwrite):
    """Average the weights of runs fine-tuned from the same start (a uniform model soup)."""
    from competition import MugeDataError
    from model.weights import CheckpointError

    from .average import average_runs

    try:
        soup = average_runs(list(run_dirs), out_dir, checkpoint=checkpoint, data_dir=data_dir, overwrite=overwrite)
    except (CheckpointError, MugeDataError, ValueError, OSError) as exc:
        raise click.ClickException(f"{exc}; nothing written") from None
    soup_score = f"; valid MR {soup['metrics']['mean_recall']:.2f}" if "metrics" in soup else ""
    click.echo(f"averaged {len(run_dirs)} runs into {os.path.join(out_dir, 'best.pt')}{soup_score}")


@click.command()
@click.option("--preset", required=True, metavar="NAME_OR_YAML",
              help="A preset of configs/: cnclip-vit-b16, cnclip-vit-l14, cnclip-vit-l14-336, cnclip-vit-h14 (or its "
              "path).")
@click.option("--gpu-memory", "gpu_memory", required=True, metavar="GIB",
              type=click.FloatRange(min=0, min_open=True, max=4096), help="Each GPU's memory, in GiB.")
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True, help="GPUs the batch splits over.")
@click.option("--global-batch", "global_batch", type=click.IntRange(min=2), metavar="PAIRS",
              help="Pairs a step learns from over all GPUs; default: the preset's train.batch_size (Chinese-CLIP's "
                   "script trains B/16 at 1,024). Below it, the plan says why that costs.")
@click.option("--json", "json_out", type=click.Path(), help="Write the plan (and its arithmetic) as JSON here.")
def plan(preset, gpu_memory, gpus, global_batch, json_out):
    """The settings a preset's training fits a card with, at the recipe's global batch: one --set line, and the
    memory model's arithmetic behind it."""
    import json

    from infra.io import atomic_write_text
    from infra.outputs import OutputKind, check_output, json_with_keys

    from .plan import PlanError, make_plan, read_memory_model, render

    name = os.path.splitext(os.path.basename(preset))[0]
    try:
        if json_out:
            check_output(json_out, OutputKind("plan", directory=False, recognise=lambda path: json_with_keys(
                path, "set_line", "arithmetic")), flag="--json")
        presets = read_memory_model()["presets"]
        if name not in presets:
            raise PlanError(f"--preset {preset}: the memory model has no figures for it (measured: "
                            f"{', '.join(sorted(presets))}); `make bench-scale` measures a preset of configs/")
        chosen = make_plan(name, presets[name], gpu_memory, gpus, global_batch)
        if json_out:
            atomic_write_text(json_out, json.dumps(chosen.to_dict(), indent=1) + "\n")
    except (PlanError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(render(chosen, os.path.join("configs", f"{name}.yaml")))


if __name__ == "__main__":  # torchrun -m train.cli ...
    from infra.logs import quiet_progress, setup_logging

    quiet_progress()
    setup_logging()
    train(prog_name="muge train")
