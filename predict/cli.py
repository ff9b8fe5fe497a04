"""`muge predict`: a bundle and a split in, a validated submission out (scored on valid)."""
from __future__ import annotations

import json
import os

import click


def default_name(bundle_dirs) -> str:
    """`A+B` from the bundles' names; shortened, with a hash of them all, when that would be
    longer than a file name may be."""
    import hashlib

    names = [os.path.basename(os.path.normpath(b)) for b in bundle_dirs]
    name = "+".join(names)
    if len(name.encode()) <= 200:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{names[0][:80]}+{len(names) - 1}-more-{digest}"


@click.command()
@click.option("--bundle", "bundle_dirs", required=True, multiple=True, type=click.Path(exists=True, file_okay=False),
              help="An export bundle; repeat it for an ensemble of bundles.")
@click.option("--data", "data_dir", default="data/sample", show_default=True,
              type=click.Path(exists=True, file_okay=False))
@click.option("--split", default="test", show_default=True, help="test | valid (valid is also scored)")
@click.option("--out", "out_path", help="Submission path (default submissions/<bundle>-<split>.jsonl): a new file "
              "or an earlier submission (replaced); anything else is refused unless --overwrite.")
@click.option("--overwrite", is_flag=True, help="Replace a file at --out (and its .result.json) that is not an "
              "earlier submission; never the bundle or the data.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp16", "fp32", "int8"]), default="auto", show_default=True,
              help="auto: fp16 graphs on CUDA, fp32 on CPU; int8 (CPU) needs a bundle from `muge export --int8`.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (CPU).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Image decode processes (default: every core this process may use but one; 0 decodes in the "
                   "main process).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per graph call (one fixed shape). Default: 128 on CUDA, 64 on CPU.")
@click.option("--cache-dir", default="cache/embeddings", show_default=True)
@click.option("--skip-bad-images", is_flag=True,
              help="Leave undecodable gallery images out (reported) instead of stopping.")
@click.option("--schema", type=click.Choice(["tianchi", "chinese-clip"]), default="tianchi", show_default=True)
@click.option("--weights", help="Ensemble weights, one per --bundle (0.6,0.4), or 'auto' to pick them on the valid "
              "split; default equal.")
@click.option("--tta", type=click.Choice(["hflip"]), help="Gallery test-time augmentation: each image's embedding "
              "averaged with its mirror's (twice the image-graph time; cached apart).")
@click.option("--rerank", type=click.Choice(["qbnorm", "dual-softmax"]),
              help="Re-rank against a bank of train queries (QB-Norm's dynamic inverted softmax, or dual-softmax).")
@click.option("--rerank-beta", type=float,
              help="Re-ranking inverse temperature, in (0, 300] (default: the bundles' trained logit scale).")
@click.option("--bank", type=click.Path(exists=True, dir_okay=False),
              help="The query bank for --rerank (default: DATA's MR_train_queries.jsonl).")
def predict(bundle_dirs, data_dir, split, out_path, overwrite, device, precision, threads, workers, batch_size,
            cache_dir, skip_bad_images, schema, weights, tta, rerank, rerank_beta, bank):
    """Embed a split's gallery and queries with ONNX Runtime and write the exact top-10 submission."""
    from competition import MugeDataError, SubmissionError
    from competition.metric import score_line
    from competition.topk import NonFiniteError
    from infra.gallery import PipelineError, default_workers
    from infra.io import exit_on_hangup_or_term

    from .manifest import BundleError
    from .submit import PredictOptions, predict_split

    exit_on_hangup_or_term()  # the decode workers stop and the submission's temporary file goes
    workers = default_workers() if workers is None else workers

    out_path = out_path or os.path.join("submissions", f"{default_name(bundle_dirs)}-{split}.jsonl")
    if weights and len(bundle_dirs) == 1:
        raise click.UsageError("--weights needs two or more --bundle")
    for flag, value in (("--rerank-beta", rerank_beta), ("--bank", bank)):
        if value is not None and not rerank:
            raise click.UsageError(f"{flag} applies to --rerank, which is not given")
    opts = PredictOptions(device=device, precision=precision, threads=threads, workers=workers, batch_size=batch_size,
                          skip_bad_images=skip_bad_images, cache_dir=cache_dir, schema=schema, tta=tta,
                          weights=weights, rerank=rerank, rerank_beta=rerank_beta, bank=bank, overwrite=overwrite)
    try:
        summary = predict_split(list(bundle_dirs), data_dir, split, out_path, opts)
    except (MugeDataError, SubmissionError, NonFiniteError, BundleError, PipelineError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if "mean_recall" in summary:
        click.echo(f"{split}: {score_line(summary)}  ->  {summary['result']}")
    click.echo(json.dumps(summary, ensure_ascii=False))
