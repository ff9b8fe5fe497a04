"""The generated references (`make docs`): docs/cli.md ends with every command's own `--help`, and
docs/config.md is every config key with its type, default and the schema's own comment. A test
renders both and fails when the committed files are stale."""
from __future__ import annotations

import copy
import os

import click

from muge_cli import cli

ROOT = os.path.dirname(os.path.abspath(__file__))
REFERENCE = "docs/cli.md"
REFERENCE_WIDTH = 110  # the help text's wrap width: the same file on every terminal
GENERATED = "## Every command and option\n"  # the reference's hand-written part ends here


def _commands(context: click.Context):
    """(full name, context) of every command under `context`'s group, in `--help`'s order; each
    context a child of its group's, as `muge X --help` renders it (the same help option names)."""
    group = context.command
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        if command is None:
            continue
        if isinstance(command, click.Group):
            yield from _commands(click.Context(command, info_name=name, parent=context))
            continue
        # a copy: click caches a command's help option as first rendered (by a test that invoked the
        # command on its own, say), and the reference shows it as `muge X --help` does
        command = copy.copy(command)
        command.params, command._help_option = list(command.params), None
        child = click.Context(command, info_name=name, parent=context)
        yield child.command_path, child


def cli_reference(head: str) -> str:
    """`head` (the reference's hand-written part: usage examples, make targets), then each
    command's own `--help` as click renders it: no option can be missing or stale."""
    parts = [head.rstrip() + "\n", GENERATED + "\nGenerated from the commands themselves by `make docs`: each "
             "one's `--help`.\n"]
    root = click.Context(cli, info_name="muge", terminal_width=REFERENCE_WIDTH, max_content_width=REFERENCE_WIDTH,
                         **cli.context_settings)
    for name, context in _commands(root):
        parts.append(f"### `{name}`\n\n```text\n{context.command.get_help(context)}\n```\n")
    return "\n".join(parts)


def reference_head(path: str = os.path.join(ROOT, REFERENCE)) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().split(GENERATED, 1)[0]


CONFIG_REFERENCE = "docs/config.md"


def config_reference() -> str:
    """Every config key (`train.config`'s schema, whose model sections are `model.config`'s) with
    its type, default and meaning, the meaning being the field's own comment in the source of the
    class that declares it: no key can be missing or stale, and a field without a comment is an
    error here (so `make docs` and its test fail)."""
    import dataclasses
    import inspect
    import io
    import tokenize
    import typing

    import train.config as schema
    from infra.records import type_name

    def comments(module) -> dict[int, tuple[int, str]]:
        """line -> (column, text) of every comment in `module`'s source."""
        return {tok.start[0]: (tok.start[1], tok.string.lstrip("#").strip())
                for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(module)).readline)
                if tok.type == tokenize.COMMENT}

    def meaning(cls, name: str) -> str:
        cls = next(c for c in cls.__mro__ if name in vars(c).get("__annotations__", {}))  # the declaring class
        found = comments(inspect.getmodule(cls))
        body, start = inspect.getsourcelines(cls)
        at = start + next(i for i, line in enumerate(body) if line.strip().startswith(name + ":"))
        if at not in found:
            raise ValueError(f"{inspect.getsourcefile(cls)}: {cls.__name__}.{name} has no comment: say what it does")
        column, text = found[at]
        # continued on the next lines: comment-only lines whose `#` is in the same column
        while at + 1 in found and found[at + 1][0] == column and not body[at + 1 - start].split("#")[0].strip():
            at += 1
            text += " " + found[at][1]
        indent = len(body[at - start]) - len(body[at - start].lstrip())
        if at + 1 in found and found[at + 1][0] > indent and not body[at + 1 - start].split("#")[0].strip():
            raise ValueError(f"{inspect.getsourcefile(cls)}:{at + 1}: {cls.__name__}.{name}'s comment goes on in "
                             f"another column: put its `#` under the one above (column {column + 1})")
        return text

    def rows(cls, prefix: str):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from rows(hints[f.name], f"{prefix}{f.name}.")
                continue
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            kind, shown = type_name(hints[f.name]), _yaml_text(default)
            yield f"| `{prefix}{f.name}` | {kind} | `{shown}` | {meaning(cls, f.name)} |"

    parts = ["# Config keys\n",
             "Generated from the schema (`train/config.py`, with `model/config.py`) by `make docs`: every key a\n"
             "preset in `configs/` or `--set KEY=VALUE` takes, its type, its default and what it does (the\n"
             "schema's own comment). Unknown keys and values of the wrong type are refused, naming the key.\n"
             "[training.md](training.md) says how the pieces fit.\n"]
    for section in dataclasses.fields(schema.Config):
        parts += [f"## {section.name}\n", "| key | type | default | meaning |", "|---|---|---|---|",
                  *rows(typing.get_type_hints(schema.Config)[section.name], f"{section.name}."), ""]
    return "\n".join(parts)


def _yaml_text(value) -> str:
    import yaml

    if isinstance(value, float):
        return f"{value:.6g}"
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def write_reference(path: str = os.path.join(ROOT, REFERENCE)) -> None:
    """`make docs`: regenerate the CLI reference's generated part in place, and the config reference."""
    from infra.io import atomic_write_text

    atomic_write_text(path, cli_reference(reference_head(path)))
    atomic_write_text(os.path.join(ROOT, CONFIG_REFERENCE), config_reference())
