"""Shared fixtures: a small generated MUGE sample, and helpers to write odd inputs."""
from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory):
    """A small sample in the MUGE layout (same generator as `make sample`, fewer items)."""
    from competition.sample import make_sample

    out = tmp_path_factory.mktemp("sample")
    make_sample(out, seed=1, n_train_queries=240, n_eval_queries=40, gallery_size=120, odd_fraction=0.05, workers=2)
    return out


@pytest.fixture(scope="session")
def runs(small_sample, tmp_path_factory):
    """One-epoch tiny runs of each family on the small sample."""
    from tiny import tiny_config

    from train.main import train_run

    out = {}
    for family in ("dual", "chinese-clip"):
        d = tmp_path_factory.mktemp(f"run-{family}")
        train_run(tiny_config(family, "train.epochs=1", "eval.untrained=false"), str(small_sample), str(d))
        out[family] = str(d)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(runs, small_sample, tmp_path_factory):
    from export.bundle import ExportOptions, export_bundle
    from export.parity import ParitySettings

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    settings = ParitySettings(queries=40, gallery=60, batch_size=16)
    export_bundle(runs["dual"], str(out), str(small_sample), ExportOptions(exporter="torchscript", settings=settings))
    return str(out)


def jpeg_bytes(color=(200, 30, 30), size=(32, 24), mode="RGB", fmt="JPEG", **save) -> bytes:
    img = Image.new(mode, size, color)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def write_tsv(path, rows, urlsafe=False) -> str:
    enc = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    with open(path, "w") as f:
        for img_id, data in rows:
            payload = data if isinstance(data, str) else enc(data).decode()
            f.write(f"{img_id}\t{payload}\n")
    return str(path)


def not_an_image(tsv_line: bytes) -> bytes:
    """The same TSV line with its image replaced by valid base64 of bytes that are no image."""
    return tsv_line.split(b"\t")[0] + b"\tbm90IGFuIGltYWdl\n"  # base64 of "not an image"


def rgb_at(img, xy=(0, 0)):
    return tuple(int(v) for v in np.asarray(img)[xy[1], xy[0]])


def brute_force_top10(encode_text, encode_images, queries, tsv, size: int, rule: str = "squash",
                      one_at_a_time: bool = True) -> list[list[int]]:
    """Each query's top-10 image ids by a full argsort of every score: the reference any ranking
    path is compared with. `encode_*`: numpy in, numpy out. Every image and query is embedded
    alone, or (`one_at_a_time=False`, for int8 graphs whose activations are quantized per call)
    all in one call, batched by the encoder as predict batches them."""
    from competition import resize_image

    pixels = [resize_image(tsv.load(i), size, rule)[None] for i in tsv.ids.tolist()]
    if one_at_a_time:
        gallery = np.concatenate([encode_images(p) for p in pixels])
        text = np.concatenate([encode_text([q.text]) for q in queries])
    else:
        gallery, text = encode_images(np.concatenate(pixels)), encode_text([q.text for q in queries])
    order = np.argsort(-(text @ gallery.T), axis=1, kind="stable")[:, :10]
    return [tsv.ids[row].tolist() for row in order]


def torch_encoders(model, tokenizer):
    """A PyTorch model's two encoders behind numpy in / numpy out (fp32, CPU)."""
    import torch

    model = model.eval().float().cpu()

    @torch.no_grad()
    def text(texts):
        ids, mask = tokenizer(texts)
        return model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    @torch.no_grad()
    def images(pixels):
        return model.encode_image(torch.from_numpy(np.ascontiguousarray(pixels).copy())).numpy()

    return text, images


def overlap(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean share of top-10 ids two rankings have in common."""
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def submission_lists(path) -> list[list[int]]:
    import json

    return [json.loads(line)["item_ids"] for line in open(path, encoding="utf-8")]


def muge(*args):
    """`muge ARGS...` through the real entry point, in process."""
    from click.testing import CliRunner

    from muge_cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def refused(result, *fragments):
    """A clear refusal: a non-zero exit, no traceback, every fragment in the output."""
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{result.output}"
    assert "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)
    return result


def accepted(result, *fragments):
    assert result.exit_code == 0, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)
    return result


def tiny_chinese_clip_dir(path, small_sample, vocab=None, vocab_rows=None):
    """A tiny random `ChineseCLIPModel` saved with `save_pretrained`, beside a BERT tokenizer of
    `vocab` (default: the sample's characters); `vocab_rows`: the text embedding's rows (default
    the vocabulary's size)."""
    import torch
    from transformers import BertTokenizerFast, ChineseCLIPConfig, ChineseCLIPModel

    from bench.shapes import TINY_CLIP
    from competition.queries import iter_queries
    from model.tokenizer import build_char_vocab

    if vocab is None:
        vocab = build_char_vocab(q.text for q in iter_queries(str(small_sample / "MR_train_queries.jsonl")))
    os.makedirs(path)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab=str(path / "vocab.txt")).save_pretrained(str(path))  # (transformers 5 ignores vocab_file=)
    torch.manual_seed(0)
    config = ChineseCLIPConfig(**{**TINY_CLIP, "text_config": {**TINY_CLIP["text_config"],
                                                                "vocab_size": vocab_rows or len(vocab)}})
    ChineseCLIPModel(config).save_pretrained(str(path))
    return path


