"""`muge bench data`: the training data pipeline at MUGE scale keeps memory bounded.

Writes a MUGE-shaped train split (130k small JPEGs in a TSV, 250k query-image pairs), builds
the training dataset (offset index, ids, packed texts) and iterates the first batches of an
epoch through the real `train_loader`, sampling the memory of the main process and of every
DataLoader worker. RSS counts pages shared with the parent (torch's own ~0.5 GB included) in
every process; PSS shares them out and USS is what a process alone holds, so both are shown.
The obvious alternative, the whole TSV in a dict, is measured on the same file for scale.
"""
from __future__ import annotations

import base64
import io
import json
import os
import tempfile
import time

import click
import numpy as np

from competition.layout import split_paths

from .memory import children, memory_mib
from .table import emit, in_checkout, table_options
from .tsv import whole_tsv_dict

CHARS = ("连衣裙女夏季新款韩版宽松显瘦白色黑色红色蓝色碎花长袖短袖"
         "男士运动鞋帆布鞋双肩包托特包斜挎包手机壳水杯马克杯帽子棒球帽")


def write_muge_train(out_dir: str, images: int, pairs: int, seed: int = 0) -> None:
    """MR_train_imgs.tsv (`images` small JPEGs) and MR_train_queries.jsonl (`pairs` pairs, 1-2 images
    per query, as in MUGE train)."""
    from PIL import Image
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    variants = []
    for _ in range(256):
        arr = np.repeat(np.repeat(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), 8, 0), 8, 1)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=85)
        variants.append(base64.urlsafe_b64encode(buf.getvalue()).decode())
    ids = rng.choice(np.arange(100_000, 10_000_000), images, replace=False)
    os.makedirs(out_dir, exist_ok=True)
    queries_path, tsv_path = split_paths(out_dir, "train")
    with open(tsv_path, "w") as f:
        for k, img_id in enumerate(tqdm(ids.tolist(), desc="writing images", leave=False)):
            f.write(f"{img_id}\t{variants[k % 256]}\n")
    chars = list(CHARS)
    with open(queries_path, "w", encoding="utf-8") as f:
        written, qid = 0, 0
        while written < pairs:
            n = min(int(rng.integers(1, 3)), pairs - written)
            text = "".join(rng.choice(chars, int(rng.integers(4, 16))))
            items = rng.choice(ids, n, replace=False).tolist()
            f.write(json.dumps({"query_id": qid, "query_text": text, "item_ids": items}, ensure_ascii=False) + "\n")
            written, qid = written + n, qid + 1


@click.command("data")
@click.option("--images", type=click.IntRange(min=1), default=130_000, show_default=True)
@click.option("--pairs", type=click.IntRange(min=1), default=250_000, show_default=True)
@click.option("--batches", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Batches of the epoch to iterate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              **in_checkout("configs/bert-convnext.yaml"),
              help="Preset whose data settings (image size, augmentation) are used.")
@click.option("--dir", "directory", default=None, help="Keep the generated split here (reused when present).")
@click.option("--main-limit-mb", type=click.IntRange(min=1), default=1536, show_default=True,
              help="RSS limit of the main process.")
@click.option("--worker-limit-mb", type=click.IntRange(min=1), default=500, show_default=True,
              help="RSS limit of each worker.")
@table_options
def bench_data(images, pairs, batches, batch_size, workers, config_path, directory, main_limit_mb, worker_limit_mb,
               json_out, csv_out):
    """Memory of the training data pipeline on a MUGE-sized train split (130k images, 250k pairs)."""
    import torch
    from tqdm import tqdm

    from model.tokenizer import prepare_tokenizer
    from train.config import load_config
    from train.data import PairDataset, train_loader

    if pairs < batch_size:  # before minutes of writing a split
        raise click.BadParameter(f"{pairs} pairs do not fill one batch of --batch-size {batch_size}",
                                 param_hint="--pairs")
    tmp = None if directory else tempfile.TemporaryDirectory()
    data_dir = directory or tmp.name
    try:
        queries, tsv_path = split_paths(data_dir, "train")
        if not os.path.isfile(queries):
            start = time.time()
            write_muge_train(data_dir, images, pairs)
            click.echo(f"wrote {images:,} images ({os.path.getsize(tsv_path) / 2**20:.0f} MiB TSV) and {pairs:,} "
                       f"pairs in {time.time() - start:.0f}s")
        cfg = load_config(config_path, [f"data.workers={workers}", f"train.batch_size={batch_size}"])
        if os.path.exists(tsv_path + ".idx.npz"):  # measure building the index, not loading it
            os.remove(tsv_path + ".idx.npz")
        tokenizer = prepare_tokenizer("char-vocab", None, queries, data_dir, cfg.data.max_text_length)
        base = memory_mib()
        start = time.time()
        dataset = PairDataset(queries, tsv_path, cfg)
        built = memory_mib()
        build_s = time.time() - start
        try:
            loader = train_loader(dataset, tokenizer, cfg, 0, 1, torch.device("cpu"))
        except ValueError as exc:  # a kept --dir split of fewer pairs than one batch
            raise click.ClickException(f"{data_dir}: {exc}") from None
        peak = {"main": dict(built)}
        start = time.time()
        n = min(batches, len(loader))
        for i, _ in enumerate(tqdm(loader, total=n, desc=f"{n} batches of {batch_size}, {workers} workers")):
            if i % 25 == 0 or i == n - 1:
                for name, pid in [("main", "self"), *((f"worker {k}", p) for k, p in enumerate(children(os.getpid())))]:
                    try:
                        now = memory_mib(pid)
                    except OSError:
                        continue
                    peak[name] = {k: max(v, peak.get(name, {}).get(k, 0)) for k, v in now.items()}
            if i + 1 >= n:
                break
        seconds = time.time() - start
        del loader
        rows = [{"process": name, "rss_mib": round(m["rss"]), "pss_mib": round(m["pss"]), "uss_mib": round(m["uss"]),
                 "rss_limit_mib": main_limit_mb if name == "main" else worker_limit_mb,
                 "within": m["rss"] < (main_limit_mb if name == "main" else worker_limit_mb)}
                for name, m in peak.items()]
        before = memory_mib()["rss"]
        whole = whole_tsv_dict(tsv_path)
        grown = memory_mib()["rss"] - before
        del whole
        ours = built["rss"] - base["rss"]
        ok = all(r["within"] for r in rows)
        emit(rows, title=f"muge bench data: {len(dataset):,} pairs over {len(dataset.tsv):,} images, {n} batches of "
                         f"{batch_size} at {cfg.data.image_size} px, {workers} workers: peak memory per process",
             json_out=json_out, csv_out=csv_out,
             extra={"pairs": len(dataset), "images": len(dataset.tsv), "dataset_build_s": build_s,
                    "samples_per_s": n * batch_size / seconds, "dataset_rss_mib": ours, "dict_rss_mib": grown},
             notes=[f"dataset built in {build_s:.1f}s (index included), +{ours:.0f} MiB in the main process; "
                    f"{n * batch_size / seconds:,.0f} samples/s",
                    f"the obvious alternative, the TSV in a dict: +{grown:.0f} MiB in one process "
                    f"(x{grown / max(ours, 1):.1f} our whole dataset); it grows with the TSV's bytes (10+ GB for "
                    "MUGE train), our index with its line count",
                    "memory limits: " + ("all within" if ok else "EXCEEDED")])
        if not ok:
            raise SystemExit(1)
    finally:
        if tmp:
            tmp.cleanup()
