"""`muge train`: fine-tune from a YAML preset with dotted overrides, or resume a run."""
from __future__ import annotations

import os

import click


@click.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="A preset from configs/ (ignored with --resume: the run's own config.yaml is used).")
@click.option("--data", "data_dir", default="data/sample", show_default=True, type=click.Path(file_okay=False),
              help="Directory holding the MUGE files.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Run directory (default runs/<preset>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. train.epochs=5.")
@click.option("--resume", "resume_dir", type=click.Path(exists=True, file_okay=False),
              help="Continue the run in this directory from its last.pt.")
def train(config_path, data_dir, out_dir, overrides, resume_dir):
    """Fine-tune a dual encoder or Chinese-CLIP on MUGE train; score valid every epoch."""
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
    out_dir = out_dir or os.path.join("runs", os.path.splitext(os.path.basename(config_path))[0])
    try:
        cfg = load_config(config_path, list(overrides))
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--config/--set") from None
    try:
        best = train_run(cfg, data_dir, out_dir, resume=bool(resume_dir))
    except (MugeDataError, CheckpointError, DistributedSetupError, TrainingDiverged, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"best valid MR {best['mean_recall']:.2f}; checkpoint {os.path.join(out_dir, 'best.pt')}")


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--checkpoint", default="best", show_default=True, help="best | last: which checkpoint of each run.")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False),
              help="Score the soup on this MUGE directory's valid split (recorded in best.pt).")
def average(run_dirs, out_dir, checkpoint, data_dir):
    """Average the weights of runs fine-tuned from the same start (a uniform model soup)."""
    from competition import MugeDataError
    from model.weights import CheckpointError

    from .average import average_runs

    try:
        soup = average_runs(list(run_dirs), out_dir, checkpoint=checkpoint, data_dir=data_dir)
    except (CheckpointError, MugeDataError, ValueError, OSError) as exc:
        raise click.ClickException(f"{exc}; nothing written") from None
    soup_score = f"; valid MR {soup['metrics']['mean_recall']:.2f}" if "metrics" in soup else ""
    click.echo(f"averaged {len(run_dirs)} runs into {os.path.join(out_dir, 'best.pt')}{soup_score}")


if __name__ == "__main__":  # torchrun -m train.cli ...
    from infra.logs import quiet_progress, setup_logging

    quiet_progress()
    setup_logging()
    train(prog_name="muge train")
