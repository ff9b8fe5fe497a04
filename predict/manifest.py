"""A bundle's `manifest.json`, as one typed record: `muge export` writes it, `predict`, the parity
gate and `muge report` read it, all through this module. Its `format` names the version of the
layout; a manifest of another version is refused at load, naming the file, rather than read
with the wrong meaning. Needs only the standard library (predict is torch-free)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Literal

from competition.preprocess import RESIZE_RULES, TEXT_NORMALIZATIONS
from infra.records import RecordError, from_dict

FORMAT = "muge-bundle/2"
# what an earlier format differs in, read as this one: muge-bundle/1 named the multiplier `logit_scale`
UPGRADES = {"muge-bundle/1": {"logit_scale": "inverse_temperature"}}
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle that is incomplete, corrupt or altered. The message names the file."""


ResizeRule = Literal[RESIZE_RULES]
TextNormalization = Literal[tuple(TEXT_NORMALIZATIONS)]
MAX_TEXT_LENGTH = 4096  # tokens: past any text tower's positions (BERT's are 512); the text graph decides below
MAX_IMAGE_SIZE = 4096   # pixels a side; the image graph's input must match it (`BundleEncoders`)
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Manifest:
    family: str                        # the model family that was exported (`model.family`; information only)
    embed_dim: int
    image_size: int                    # the image graph's input side, in pixels
    resize_rule: ResizeRule            # competition.preprocess's rule the gallery is resized with
    max_text_length: int
    text_normalization: TextNormalization  # competition.preprocess's normalisation before the tokenizer
    inverse_temperature: float         # the similarity's multiplier: exp of the model's learned `logit_scale`
    files: dict[str, str]              # every graph and external-data file (a plain name) -> its sha256
    opset: int = 18
    exporter: str = "dynamo"
    graph_exports: dict = field(default_factory=dict)   # tower -> how its graph was exported
    fusion: dict = field(default_factory=dict)          # tower -> ORT's fused-op counts
    source_checkpoint: str | None = None
    source_sha256: str | None = None
    source_epoch: int | None = None
    source_valid_metrics: dict | None = None
    source_pretrained: dict | None = None               # `muge export --pretrained`: the published weights
    libraries: dict = field(default_factory=dict)
    external_data: dict[str, list[str]] = field(default_factory=dict)  # graph -> its data files (> 2 GiB)
    parity: dict | None = None                          # the gate's report (`export.parity.ParityReport`)
    image_input: str = "uint8 NHWC, resized"
    format: str = FORMAT

    def to_dict(self) -> dict:
        out = {"format": self.format, **{k: v for k, v in dataclasses.asdict(self).items() if k != "format"}}
        for optional in ("external_data", "source_pretrained", "parity"):  # absent rather than empty
            if not out[optional]:
                del out[optional]
        return out


def is_plain_file_name(name: str) -> bool:
    """A file directly inside the bundle: no directory part, not `.` or `..`, not absolute."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def manifest_from_dict(values, path: str) -> Manifest:
    """The manifest of `values` (a parsed manifest.json), checked: its format version first, then
    every field's presence and type (`infra.records`), then the ranges and names a type
    cannot say. Every refusal names `path` and the field."""
    if not isinstance(values, dict):
        raise BundleError(f"{path}: not a muge bundle manifest (a JSON {type(values).__name__}); re-export the bundle")
    version = values.get("format")
    renamed = UPGRADES.get(version, {})
    if renamed:
        stray = sorted(new for new in renamed.values() if new in values)
        if stray:
            raise BundleError(f"{path}: a {version} manifest that also has {', '.join(stray)}, which that format "
                              f"names {', '.join(old for old, new in renamed.items() if new in stray)}: it was edited "
                              "or mixed up; re-export the bundle")
        values = {"format": FORMAT, **{renamed.get(k, k): v for k, v in values.items() if k != "format"}}
    elif version != FORMAT:
        raise BundleError(f"{path}: format {version!r}, but this muge reads {FORMAT!r} bundles: export the bundle "
                          "again with this version (or predict with the version that wrote it)")
    try:
        manifest = from_dict(Manifest, values, what="manifest")
        _check_values(manifest)
    except RecordError as exc:
        message = str(exc)
        for old, new in renamed.items():  # named as the file names it
            message = re.sub(rf"\b{new}\b", old, message)
        raise BundleError(f"{path}: {message}; re-export the bundle") from None
    return manifest


def _check_values(m: Manifest) -> None:
    ranges = (("embed_dim", m.embed_dim, 1, None), ("image_size", m.image_size, 1, MAX_IMAGE_SIZE),
              ("max_text_length", m.max_text_length, 1, MAX_TEXT_LENGTH), ("opset", m.opset, 1, None),
              ("source_epoch", m.source_epoch, 0, None))
    for key, value, low, high in ranges:
        if value is not None and (value < low or high is not None and value > high):
            raise RecordError(f"{key}={value}: expected {f'{low} to {high}' if high else f'at least {low}'}")
    if not (math.isfinite(m.inverse_temperature) and m.inverse_temperature > 0):
        raise RecordError(f"inverse_temperature={m.inverse_temperature}: expected a positive finite number")
    for name, digest in m.files.items():
        if not is_plain_file_name(name):
            raise RecordError(f"files: {name!r} is not a file name inside the bundle")
        if not _SHA256.fullmatch(digest):
            raise RecordError(f"files.{name}={digest!r}: expected a sha256 (64 hex digits)")
    for graph, data_files in m.external_data.items():
        if graph not in m.files:
            raise RecordError(f"external_data: {graph!r} is not a graph of files")
        for name in data_files:
            if not is_plain_file_name(name):
                raise RecordError(f"external_data.{graph}: {name!r} is not a file name inside the bundle")
            if name not in m.files:
                raise RecordError(f"external_data.{graph}: {name!r} has no sha256 in files")


def read_manifest(bundle_dir: str) -> Manifest:
    path = os.path.join(bundle_dir, MANIFEST)
    if not os.path.isfile(path):
        raise BundleError(f"{path} not found: {bundle_dir} is not an export bundle (run `muge export`)")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); re-export the bundle") from None
    except RecursionError:
        raise BundleError(f"{path}: nested too deeply to be a muge bundle manifest; re-export the bundle") from None
    return manifest_from_dict(values, path)


def write_manifest(bundle_dir: str, manifest: Manifest) -> None:
    with open(os.path.join(bundle_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest.to_dict(), f, indent=2, ensure_ascii=False)
