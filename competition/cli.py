"""`muge sample`, `muge score`, `muge check-submission`: the commands that are the task itself."""
from __future__ import annotations

import json
import sys

import click

from .errors import MugeDataError


@click.command()
@click.argument("out_dir", type=click.Path())
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--train-queries", type=click.IntRange(min=1), default=3000, show_default=True)
@click.option("--eval-queries", type=click.IntRange(min=1), default=500, show_default=True,
              help="Valid and test queries each.")
@click.option("--gallery-size", type=click.IntRange(min=10), default=1000, show_default=True,
              help="Images per split (a submission needs 10 per query).")
@click.option("--hard", is_flag=True, help="Finer attributes, weaker cues, more near-duplicates: a sample with "
              "headroom for measuring what helps (`make bench-quality`).")
@click.option("--overwrite", is_flag=True, help="Write into OUT_DIR even if it holds files that are not a sample "
              "(the MUGE file names among them are replaced).")
def sample(out_dir, seed, train_queries, eval_queries, gallery_size, hard, overwrite):
    """Write the embedded sample dataset (MUGE layout) into OUT_DIR: a new or empty directory, or an earlier sample."""
    from .sample import EASY, HARD, make_sample

    click.echo(f"drawing the {'hard ' if hard else ''}sample dataset into {out_dir} (seed {seed}) ...")
    try:
        info = make_sample(out_dir, seed=seed, n_train_queries=train_queries, n_eval_queries=eval_queries,
                           gallery_size=gallery_size, difficulty=HARD if hard else EASY, overwrite=overwrite)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(info, ensure_ascii=False))


@click.command()
@click.argument("ground_truth", type=click.Path(dir_okay=False))
@click.argument("pred", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(), help="Write the evaluator's result JSON here.")
@click.option("--ranks", type=click.Path(), help="Write each query's first-hit rank (jsonl) here.")
@click.option("--per-query", "per_query_csv", type=click.Path(),
              help="Write one CSV row per query (id, text, first-hit rank, hits at 1/5/10, positives) here.")
@click.option("--overwrite", is_flag=True, help="Replace files at --out / --ranks / --per-query that muge did not "
              "write (never GROUND_TRUTH or PRED).")
def score(ground_truth, pred, out, ranks, per_query_csv, overwrite):
    """Score PRED against GROUND_TRUTH exactly as the official evaluator (R@1/5/10, MeanRecall)."""
    from infra.io import atomic_write_text
    from infra.outputs import check_output

    from .metric import (
        PER_QUERY,
        RANKS,
        RESULT,
        failure_json,
        per_query,
        score_predictions,
        spreadsheet_csv,
        success_json,
        write_result,
    )
    from .queries import read_queries
    from .submission import check_submission

    try:  # every output path before any work
        for flag, path, kind in (("--out", out, RESULT), ("--ranks", ranks, RANKS),
                                 ("--per-query", per_query_csv, PER_QUERY)):
            if path:
                check_output(path, kind, [ground_truth, pred], overwrite, flag=flag)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None

    try:  # whatever is wrong, a result JSON is written, as the reference evaluator does
        gt = read_queries(ground_truth, require_ids=True)
        report = check_submission(ground_truth, pred, queries=gt, allow_bom=True)
    except (MugeDataError, OSError) as exc:
        result = failure_json(str(exc))
        report = None
    for w in report.warnings if report is not None else ():
        click.echo(f"warning: {w}", err=True)
    if report is not None and not report.ok:
        result = failure_json(report.errors[0], "\n".join(report.errors))
    elif report is not None:
        s = score_predictions(gt, report.predictions)
        result = success_json(s)
        click.echo(s.summary())
    try:
        if report is not None and report.ok and ranks:
            atomic_write_text(ranks, "".join(
                json.dumps({"query_id": int(q), "first_hit_rank": int(r) or None}) + "\n"
                for q, r in zip(s.query_ids, s.first_hit)))
        if report is not None and report.ok and per_query_csv:
            atomic_write_text(per_query_csv, spreadsheet_csv(per_query(s, gt)))
        if out:
            write_result(out, result)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    if not result["success"]:
        click.echo(f"rejected: {result['errorDetail']}", err=True)
        sys.exit(1)


@click.command("check-submission")
@click.argument("queries", type=click.Path(dir_okay=False))
@click.argument("pred", type=click.Path(dir_okay=False))
def check_submission_cmd(queries, pred):
    """Report every problem the reference evaluator would reject PRED for."""
    from .submission import check_submission

    try:
        report = check_submission(queries, pred)
    except (MugeDataError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    for e in report.errors:
        click.echo(f"error: {e}", err=True)
    if not report.ok:
        click.echo(f"{pred}: REJECTED ({len(report.errors)} problem(s))", err=True)
        sys.exit(1)
    click.echo(f"{pred}: OK ({len(report.predictions)} predictions)")
