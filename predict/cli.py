"""`muge predict`: a bundle and a split in, a validated submission out (scored on valid)."""
from __future__ import annotations

import json
import os

import click


@click.command()
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", "data_dir", default="data/sample", show_default=True,
              type=click.Path(exists=True, file_okay=False))
@click.option("--split", default="test", show_default=True, help="test | valid (valid is also scored)")
@click.option("--out", "out_path", help="Submission path (default submissions/<bundle>-<split>.jsonl).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp16", "fp32", "int8"]), default="auto", show_default=True,
              help="auto: fp16 graphs on CUDA, fp32 on CPU; int8 (CPU) needs a bundle from `muge export --int8`.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (CPU).")
@click.option("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), show_default=True,
              help="Image decode processes.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per graph call (one fixed shape). Default: 128 on CUDA, 64 on CPU.")
@click.option("--cache-dir", default="cache/embeddings", show_default=True)
@click.option("--skip-bad-images", is_flag=True,
              help="Leave undecodable gallery images out (reported) instead of stopping.")
@click.option("--schema", type=click.Choice(["tianchi", "chinese-clip"]), default="tianchi", show_default=True)
def predict(bundle_dir, data_dir, split, out_path, device, precision, threads, workers, batch_size, cache_dir,
            skip_bad_images, schema):
    """Embed a split's gallery and queries with ONNX Runtime and write the exact top-10 submission."""
    from competition import MugeDataError, SubmissionError
    from competition.topk import NonFiniteError

    from .runtime import BundleError
    from .submit import PredictOptions, predict_split

    name = os.path.basename(os.path.normpath(bundle_dir))
    out_path = out_path or os.path.join("submissions", f"{name}-{split}.jsonl")
    opts = PredictOptions(device=device, precision=precision, threads=threads, workers=workers, batch_size=batch_size,
                          skip_bad_images=skip_bad_images, cache_dir=cache_dir, schema=schema)
    try:
        summary = predict_split(bundle_dir, data_dir, split, out_path, opts)
    except (MugeDataError, SubmissionError, NonFiniteError, BundleError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if "mean_recall" in summary:
        click.echo(f"{split}: R@1 {summary['r1']:.2f}  R@5 {summary['r5']:.2f}  R@10 {summary['r10']:.2f}  "
                   f"MR {summary['mean_recall']:.2f}  ->  {summary['result']}")
    click.echo(json.dumps(summary, ensure_ascii=False))
