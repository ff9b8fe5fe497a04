"""`muge export RUN_DIR --out OUT`: the run's model as an ONNX bundle (the default), a `transformers`
directory (`--format hf`) or a Chinese-CLIP checkpoint file (`--format cnclip`)."""
from __future__ import annotations

import sys

import click

WRITES = {"onnx": "bundle", "hf": "transformers directory", "cnclip": "Chinese-CLIP checkpoint"}  # by --format


@click.command()
@click.argument("run_dir", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--pretrained", metavar="NAME_DIR_OR_PT", help="Zero-shot: export Chinese-CLIP weights instead of a run: "
              "a hub name (OFA-Sys/chinese-clip-vit-base-patch16, TencentARC/QA-CLIP-ViT-B-16), a transformers "
              "directory, or a cn_clip checkpoint file (clip_cn_vit-b-16.pt, epoch_latest.pt).")
@click.option("--tokenizer", metavar="DIR_OR_NAME", help="With --pretrained: the tokenizer (default: the weights' own; "
              "for a cn_clip .pt file, the installed cn_clip package's vocabulary).")
@click.option("--attention-heads", metavar="VISION,TEXT", help="With --pretrained X.pt of a shape Chinese-CLIP does "
              "not publish: the attention heads of each tower (the tensors cannot tell; default: 64-wide heads).")
@click.option("--out", "out_dir", required=True, type=click.Path(),
              help="What to write: the bundle's directory (--format onnx), the transformers directory (hf), or the "
              ".pt file (cnclip). A new path, or an earlier output of the same format (replaced); anything else is "
              "refused unless --overwrite.")
@click.option("--data", "data_dir", default="data/sample", show_default=True,
              help="MUGE directory whose valid split feeds the parity gate.")
@click.option("--checkpoint", default="best", show_default=True, help="best | last | a .pt path")
@click.option("--opset", default=18, show_default=True, help="For graphs not fused (see --fuse).")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True,
              help="For graphs not fused (see --fuse).")
@click.option("--parity-queries", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--parity-gallery", type=click.IntRange(min=10), default=1000, show_default=True,
              help="Valid images used by the gate.")
@click.option("--parity-batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="Where the fp16 graphs are checked.")
@click.option("--fuse/--no-fuse", default=True, show_default=True,
              help="Export transformer towers for ORT's fusion (TorchScript exporter, eager attention) and fuse them.")
@click.option("--int8", is_flag=True, help="Also write gated int8 graphs for CPU predict (--precision int8).")
@click.option("--format", "fmt", type=click.Choice(list(WRITES)), default="onnx", show_default=True,
              help="onnx: the bundle predict runs. hf: a transformers directory (ChineseCLIPModel, its tokenizer and "
              "processor, a model card). cnclip: Chinese-CLIP's checkpoint file (--out X.pt), which cn_clip loads. "
              "hf and cnclip: for a model whose family has them (Chinese-CLIP's).")
@click.option("--overwrite", is_flag=True, help="Replace what is at --out even if muge did not write it there (never "
              "the run, its checkpoint, the weights or data being read, or a directory holding them).")
def export(run_dir, pretrained, tokenizer, attention_heads, out_dir, data_dir, checkpoint, opset, exporter,
           parity_queries, parity_gallery, parity_batch, device, fuse, int8, fmt, overwrite):
    """Export RUN_DIR's checkpoint (or --pretrained weights): an ONNX bundle (fp32 + fp16) behind a parity gate, a
    transformers directory, or a Chinese-CLIP checkpoint."""
    from competition import MugeDataError
    from infra.io import exit_on_hangup_or_term
    from infra.outputs import OutputError
    from model.config import ConfigError
    from model.tokenizer import TokenizerError
    from model.weights import CheckpointError, WeightsError

    from .bundle import ExportOptions, export_bundle
    from .formats import export_cnclip, export_hf
    from .parity import ParityError, ParitySettings

    exit_on_hangup_or_term()  # the build directory is removed on the way out (SIGKILL: by the next export)
    if bool(run_dir) == bool(pretrained):
        raise click.UsageError("give a RUN_DIR or --pretrained NAME_DIR_OR_PT (one of them)")
    for flag, value in (("--tokenizer", tokenizer), ("--attention-heads", attention_heads)):
        if value and not pretrained:
            raise click.UsageError(f"{flag} goes with --pretrained (a run brings its own)")
    if fmt != "onnx" and (pretrained or int8):
        raise click.UsageError(f"--format {fmt} writes a run's model (RUN_DIR); --pretrained and --int8 go with the "
                               "ONNX bundle")
    if pretrained and checkpoint != "best":
        raise click.UsageError("--checkpoint picks a run's checkpoint; with --pretrained the weights are its file")
    heads = None
    if attention_heads:
        try:
            heads = tuple(int(x) for x in attention_heads.split(","))
        except ValueError:
            heads = ()
        if len(heads) != 2 or min(heads) < 1:
            raise click.BadParameter(f"{attention_heads!r}: expected two positive counts, VISION,TEXT (e.g. 16,16)",
                                     param_hint="--attention-heads")
    opts = ExportOptions(checkpoint=checkpoint, opset=opset, exporter=exporter, device=device, fused=fuse, int8=int8,
                         settings=ParitySettings(parity_queries, parity_gallery, parity_batch))
    try:
        if fmt == "hf":
            export_hf(run_dir, out_dir, checkpoint, overwrite)
        elif fmt == "cnclip":
            export_cnclip(run_dir, out_dir, checkpoint, overwrite)
        else:
            export_bundle(run_dir or pretrained, out_dir, data_dir, opts, tokenizer=tokenizer, heads=heads,
                          overwrite=overwrite)
    except ParityError as exc:
        click.echo(f"export refused, no bundle written: {exc}", err=True)
        sys.exit(2)
    except (CheckpointError, MugeDataError, WeightsError, TokenizerError, ConfigError, OutputError, OSError) as exc:
        raise click.ClickException(f"{exc}; no {WRITES[fmt]} written") from None
    click.echo(f"{WRITES[fmt]} written to {out_dir}")
