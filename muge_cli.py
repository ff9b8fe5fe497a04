"""`muge`: one console script, a subcommand per stage. Subcommands load lazily, so `muge score`
or `muge predict` never pays for importing torch. (`muge_docs` renders their reference.)"""
from __future__ import annotations

import importlib
import os

import click

COMMANDS = {  # name -> "module:attribute"
    "sample": "competition.cli:sample",
    "score": "competition.cli:score",
    "check-submission": "competition.cli:check_submission_cmd",
    "train": "train.cli:train",
    "average": "train.cli:average",
    "plan": "train.cli:plan",
    "export": "export.cli:export",
    "predict": "predict.cli:predict",
    "report": "report.cli:report",
}
BENCHES = {name: f"bench.{name}:bench_{name}"  # `muge bench NAME` is bench/NAME.py
           for name in ("tsv", "topk", "predict", "export", "data", "train", "gpu", "quality", "lora", "loss", "scale")}


class LazyGroup(click.Group):
    commands_table = COMMANDS

    def list_commands(self, ctx):
        return list(self.commands_table) + list(self.commands)

    def get_command(self, ctx, name):
        if name in self.commands:
            return self.commands[name]
        target = self.commands_table.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool):
    """Fine-tune, export, predict and score Tianchi MUGE text-to-image retrieval."""
    from infra.logs import setup_logging

    setup_logging(verbose)


class BenchGroup(LazyGroup):
    commands_table = BENCHES


@cli.group(cls=BenchGroup)
def bench():
    """Benchmarks: each prints ours vs. the obvious alternative, measured in one run."""


def main():
    from infra.logs import quiet_progress

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_progress()  # before any subcommand imports tqdm
    cli(prog_name="muge")


if __name__ == "__main__":
    main()
