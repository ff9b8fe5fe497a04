"""Every bench's figures as one table: a pandas DataFrame, printed, and written with `--json`
and `--csv`. Each written table is stamped with the date, the commit and the machine, which is
what `docs/benchmarks.md` quotes beside each figure."""
from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import subprocess

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_csv(path: str) -> bool:
    from infra.outputs import read_head

    return read_head(path, 1 << 16).split("\n", 1)[0].rstrip("\r").endswith(",date,commit,machine")


def _bench_json(path: str) -> bool:
    from infra.outputs import json_with_keys

    return json_with_keys(path, "bench", "date", "rows")


TABLE_KINDS = {"--json": ("bench table (JSON)", _bench_json), "--csv": ("bench table (CSV)", _bench_csv)}
# what a bench keeps under --work, in a work directory written before the output marker
WORK_ENTRIES = ("runs", "bundles", "submissions", "cache", "seconds.json", "start-hf", "sample", "bench")


def writable_output(ctx, param, value):
    """A click callback: an output file is a new one, or an earlier table of this option's kind
    (`infra.outputs`), and can be created where it is to go; checked before any work (a bench that
    runs for minutes must not fail at its last line)."""
    from infra.outputs import OutputKind, check_output

    if value is not None:
        flag = param.opts[0]
        name, recognise = TABLE_KINDS[flag]
        try:
            check_output(value, OutputKind(name, directory=False, recognise=recognise), flag=flag)
        except (ValueError, OSError) as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


def _bench_work(path: str) -> bool:
    """A bench's work directory written before the output marker: only what a bench keeps there."""
    return all(name in WORK_ENTRIES or name.startswith(("data-", "cnclip-vit-", ".")) for name in os.listdir(path))


def prepare_work(work: str, sources=()) -> str:
    """`--work`: a new or empty directory, or a bench's own (`infra.outputs`), never one holding or
    inside what the bench reads (`sources`); made and marked as the bench's."""
    from infra.outputs import OutputKind, check_output, write_marker

    kind = OutputKind("bench work directory", recognise=_bench_work)
    try:
        check_output(work, kind, sources, flag="--work")
        os.makedirs(work, exist_ok=True)
    except (ValueError, OSError) as exc:
        raise click.BadParameter(str(exc), param_hint="--work") from None
    write_marker(work, kind)
    return work


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, less NaN (every comparison with NaN is false, so click lets it through)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number", param, ctx)
        return number


def in_checkout(*relative: str) -> dict:
    """An option's default path(s) of the checkout (configs/X.yaml, data/sample), whatever the
    current directory, shown as the checkout's own (the same help text on every machine)."""
    paths = tuple(os.path.join(ROOT, r) for r in relative)
    shown = "the checkout's " + ", ".join(relative)
    return {"default": paths[0] if len(paths) == 1 else paths, "show_default": shown}


def table_options(command):
    """`--json OUT` and `--csv OUT` on a bench command, checked before any work."""
    command = click.option("--csv", "csv_out", type=click.Path(dir_okay=False), callback=writable_output,
                           help="Write the table as CSV.")(command)
    return click.option("--json", "json_out", type=click.Path(dir_okay=False), callback=writable_output,
                        help="Write the table (and the date, commit and machine) as JSON.")(command)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit() -> str:
    """The checkout's commit, `-dirty` when tracked files differ from it; `unknown` outside git."""
    head = _git("rev-parse", "--short=12", "HEAD")
    if head is None:
        return "unknown"
    return head + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


@functools.lru_cache(maxsize=1)
def machine() -> str:
    """CPU model and core count, and the GPUs `nvidia-smi` lists (none on a CPU box)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} CPUs"
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
        names = [g.strip() for g in gpus.stdout.splitlines() if g.strip()] if gpus.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        names = []
    return text + (f"; {len(names)} x {names[0]}" if names else "; no GPU")


def stamp() -> dict:
    return {"date": datetime.date.today().isoformat(), "commit": commit(), "machine": machine()}


def _plain(value):
    """numpy scalars and arrays as JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def emit(rows: list[dict], *, title: str, json_out: str | None = None, csv_out: str | None = None,
         notes: list[str] = (), extra: dict | None = None):
    """Print `rows` as a table under `title` (then `notes`), write them as JSON / CSV when asked;
    return the DataFrame."""
    import pandas as pd

    from infra.io import atomic_write_text

    frame = pd.DataFrame(rows)
    click.echo(title)
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_colwidth", 80):
        click.echo(frame.to_string(index=False, na_rep="-", float_format=_number))
    for note in notes:
        click.echo(note)
    stamped = stamp()
    if json_out:
        body = {"bench": title, **stamped, **(extra or {}), "rows": rows, "notes": list(notes)}
        atomic_write_text(json_out, json.dumps(body, indent=2, ensure_ascii=False, default=_plain) + "\n")
        click.echo(f"table written to {json_out}")
    if csv_out:
        atomic_write_text(csv_out, frame.assign(**stamped).to_csv(index=False))
        click.echo(f"table written to {csv_out}")
    return frame


def _number(x: float) -> str:
    """Three significant figures, at least the units (1,478 not 1.48e+03)."""
    if x != x:  # NaN
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"
