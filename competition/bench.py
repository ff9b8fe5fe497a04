"""`muge bench tsv`: reading a large gallery TSV by id keeps memory bounded (no whole-file load)."""
from __future__ import annotations

import base64
import os
import resource
import tempfile
import time

import click
import numpy as np


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


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


@click.command("tsv")
@click.option("--size-mb", default=1024, show_default=True)
@click.option("--reads", default=20_000, show_default=True)
@click.option("--dir", "directory", default=None, help="Where to write the synthetic TSV (default: a temp dir).")
def bench_tsv(size_mb, reads, directory):
    """Index a synthetic SIZE_MB TSV and read random ids; print time and peak RSS."""
    from .images import ImageTSV

    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = os.path.join(tmp, "big.tsv")
        t = time.time()
        n = write_synthetic_tsv(path, size_mb)
        click.echo(f"wrote {os.path.getsize(path) / 2**20:.0f} MiB, {n} lines in {time.time() - t:.1f}s")
        base = current_rss_mb()
        t = time.time()
        tsv = ImageTSV(path, cache_dir=tmp)
        click.echo(f"index built in {time.time() - t:.1f}s ({n / (time.time() - t):.0f} lines/s)")
        t = time.time()
        tsv = ImageTSV(path, cache_dir=tmp)
        click.echo(f"cached index loaded in {time.time() - t:.3f}s")
        rng = np.random.default_rng(1)
        picks = rng.choice(tsv.ids, reads)
        t = time.time()
        total = 0
        for img_id in picks.tolist():
            total += len(tsv.read_bytes(img_id))
        dt = time.time() - t
        click.echo(f"{reads} random reads by id: {reads / dt:.0f} reads/s, {total / 2**20 / dt:.0f} MiB/s decoded")
        click.echo(f"RSS before index {base:.0f} MiB, now {current_rss_mb():.0f} MiB, peak {peak_rss_mb():.0f} MiB "
                   f"for a {os.path.getsize(path) / 2**20:.0f} MiB TSV")
