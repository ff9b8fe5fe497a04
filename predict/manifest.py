"""A bundle's `manifest.json`, as one typed record: `muge export` writes it, `predict`, the parity
gate and `muge report` read it, all through this module. Its `format` names the version of the
layout; a manifest of another version is refused at load, naming the file, rather than read
with the wrong meaning. Needs only the standard library (predict is torch-free)."""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field

FORMAT = "muge-bundle/1"
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle that is incomplete, corrupt or altered. The message names the file."""


@dataclass
class Manifest:
    family: str                        # dual | chinese-clip
    embed_dim: int
    image_size: int                    # the image graph's input side, in pixels
    resize_rule: str                   # competition.preprocess's rule the gallery is resized with
    max_text_length: int
    text_normalization: str            # competition.preprocess's normalisation before the tokenizer
    logit_scale: float
    files: dict[str, str]              # every graph and external-data file -> its sha256
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
    parity: dict | None = None                          # the gate's report (`export.parity.GateReport`)
    image_input: str = "uint8 NHWC, resized"
    format: str = FORMAT

    def to_dict(self) -> dict:
        out = {"format": self.format, **{k: v for k, v in dataclasses.asdict(self).items() if k != "format"}}
        for optional in ("external_data", "source_pretrained", "parity"):  # absent rather than empty
            if not out[optional]:
                del out[optional]
        return out


def _matches(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def manifest_from_dict(values, path: str) -> Manifest:
    """The manifest of `values` (a parsed manifest.json), checked: its format version first, then
    each field's presence and type. Every refusal names `path`."""
    if not isinstance(values, dict):
        raise BundleError(f"{path}: not a muge bundle manifest (a JSON {type(values).__name__}); re-export the bundle")
    version = values.get("format")
    if version != FORMAT:
        raise BundleError(f"{path}: format {version!r}, but this muge reads {FORMAT!r} bundles: export the bundle "
                          "again with this version (or predict with the version that wrote it)")
    hints = typing.get_type_hints(Manifest)
    fields = {f.name: f for f in dataclasses.fields(Manifest)}
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in values:
            if required:
                raise BundleError(f"{path}: no '{name}': not a muge bundle manifest (re-export the bundle)")
        elif not _matches(values[name], hints[name]):
            raise BundleError(f"{path}: bad value for '{name}' ({values[name]!r}); re-export the bundle")
    return Manifest(**{k: v for k, v in values.items() if k in fields})


def read_manifest(bundle_dir: str) -> Manifest:
    path = os.path.join(bundle_dir, MANIFEST)
    if not os.path.isfile(path):
        raise BundleError(f"{path} not found: {bundle_dir} is not an export bundle (run `muge export`)")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); re-export the bundle") from None
    return manifest_from_dict(values, path)


def write_manifest(bundle_dir: str, manifest: Manifest) -> None:
    with open(os.path.join(bundle_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest.to_dict(), f, indent=2, ensure_ascii=False)
