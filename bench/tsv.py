"""`muge bench tsv`: a large gallery TSV read by id through the offset index, against the obvious
alternative (the whole file in a dict of id -> base64) on the same file: time and memory."""
from __future__ import annotations

import base64
import os
import tempfile
import time

import click
import numpy as np

from .memory import memory_mib
from .table import emit, table_options


def write_synthetic_tsv(path: str, size_mb: int, payload_kb: int = 24, seed: int = 0) -> int:
    """Lines of random base64 (no image decoding is measured here), about `size_mb` in all."""
    rng = np.random.default_rng(seed)
    blob = base64.b64encode(rng.bytes(payload_kb * 768)).decode()  # ~payload_kb KB of base64
    n = (size_mb << 20) // (len(blob) + 10)
    ids = rng.choice(np.arange(1_000_000, 10_000_000), n, replace=False)
    with open(path, "w") as f:
        for i, img_id in enumerate(ids.tolist()):
            k = i % len(blob)
            f.write(f"{img_id}\t{blob[k:] + blob[:k]}\n")
    return n


def whole_tsv_dict(path: str) -> dict[int, bytes]:
    """The obvious alternative to the offset index: every line's base64 in a dict by image id."""
    whole = {}
    with open(path, "rb") as f:
        for line in f:
            tab = line.index(b"\t")
            whole[int(line[:tab])] = line[tab + 1:].rstrip(b"\n")
    return whole


def _random_reads(read, ids: np.ndarray, reads: int) -> tuple[float, int]:
    """(reads per second, bytes read) for `reads` random ids."""
    picks = np.random.default_rng(1).choice(ids, reads).tolist()
    start, total = time.perf_counter(), 0
    for img_id in picks:
        total += len(read(img_id))
    return reads / (time.perf_counter() - start), total


@click.command("tsv")
@click.option("--size-mb", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--reads", type=click.IntRange(min=1), default=20_000, show_default=True)
@click.option("--dir", "directory", type=click.Path(exists=True, file_okay=False), default=None,
              help="Where to write the synthetic TSV (default: a temp dir).")
@table_options
def bench_tsv(size_mb, reads, directory, json_out, csv_out):
    """A SIZE_MB TSV: our offset index (build, cached load, reads by id) vs the whole file in a dict."""
    from competition.images import ImageTSV

    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = os.path.join(tmp, "big.tsv")
        n = write_synthetic_tsv(path, size_mb)
        mib = os.path.getsize(path) / 2**20
        base = memory_mib()["rss"]
        start = time.perf_counter()
        tsv = ImageTSV(path, cache_dir=tmp)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        tsv = ImageTSV(path, cache_dir=tmp)
        load_s = time.perf_counter() - start
        rate, _ = _random_reads(tsv.read_payload, tsv.ids, reads)
        ours = {"reader": "offset index (ours)", "open_s": round(build_s, 2), "reopen_s": round(load_s, 3),
                "reads_per_s": round(rate), "rss_added_mib": round(memory_mib()["rss"] - base, 1)}
        del tsv
        base = memory_mib()["rss"]
        start = time.perf_counter()
        whole = whole_tsv_dict(path)
        dict_s = time.perf_counter() - start
        rate, _ = _random_reads(whole.__getitem__, np.fromiter(whole, np.int64, len(whole)), reads)
        alternative = {"reader": "whole TSV in a dict", "open_s": round(dict_s, 2), "reopen_s": round(dict_s, 2),
                       "reads_per_s": round(rate), "rss_added_mib": round(memory_mib()["rss"] - base, 1)}
        del whole
    ratio = alternative["rss_added_mib"] / max(ours["rss_added_mib"], 0.1)
    emit([ours, alternative], title=f"muge bench tsv: a {mib:,.0f} MiB TSV of {n:,} lines, {reads:,} random reads",
         json_out=json_out, csv_out=csv_out, extra={"tsv_mib": mib, "lines": n},
         notes=[f"memory: the dict holds x{ratio:,.0f} what the index does, and grows with the TSV's bytes (10+ GB "
                "for MUGE train) where the index grows with its line count; the index is built once and cached"])
