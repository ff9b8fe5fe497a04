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

    from train.main import run

    out = {}
    for family in ("dual", "chinese-clip"):
        d = tmp_path_factory.mktemp(f"run-{family}")
        run(tiny_config(family, "train.epochs=1", "eval.untrained=false"), str(small_sample), str(d))
        out[family] = str(d)
    return out


@pytest.fixture(scope="session")
def tiny_bundle(runs, small_sample, tmp_path_factory):
    from export.bundle import export_bundle
    from export.parity import ParitySettings

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(runs["dual"], str(out), str(small_sample), exporter="torchscript",
                  settings=ParitySettings(queries=40, gallery=60, batch_size=16))
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
