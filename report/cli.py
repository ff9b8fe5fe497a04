"""`muge report --queries Q --images TSV --pred PRED [--pred OTHER] --out report.html`."""
from __future__ import annotations

import click


@click.command()
@click.option("--queries", "queries_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Queries with ground truth (MR_valid_queries.jsonl).")
@click.option("--images", "images_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Their gallery TSV (MR_valid_imgs.tsv).")
@click.option("--pred", "preds", required=True, multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="A prediction file; give --pred twice to compare A (first) with B (second).")
@click.option("--out", "out_path", required=True, type=click.Path(),
              help="The HTML file to write: a new file or an earlier report (replaced).")
@click.option("--overwrite", is_flag=True, help="Replace a file at --out that is not an earlier report (never an "
              "input).")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False),
              help="Training run (or bundle) directory: adds its valid-recall curves.")
@click.option("--thumb-size", type=click.IntRange(8, 512), default=64, show_default=True,
              help="Thumbnail edge in pixels.")
@click.option("--quality", type=click.IntRange(1, 95), default=70, show_default=True, help="Thumbnail JPEG quality.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Thumbnail processes (default: all cores).")
def report(queries_path, images_path, preds, out_path, overwrite, run_dir, thumb_size, quality, workers):
    """Write a self-contained HTML report: metrics, first-hit histogram, per-query top-10 with
    ground truth marked and missed truth shown, filters, and a comparison of two runs."""
    from competition import MugeDataError

    from .build import write_report

    if len(preds) > 2:
        raise click.UsageError("give --pred once, or twice to compare two runs")
    try:
        info = write_report(out_path, overwrite, queries_path=queries_path, images_path=images_path,
                            pred_paths=list(preds), run_dir=run_dir, thumb_size=thumb_size, quality=quality,
                            workers=workers)
    except (MugeDataError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    mr = "  ".join(f"{name} MR {m['mean_recall']:.2f}" for name, m in info["metrics"].items())
    click.echo(f"report written to {out_path}: {info['queries']} queries, {info['thumbnails']} thumbnails, "
               f"{info['bytes'] / 2**20:.1f} MiB ({mr})")
