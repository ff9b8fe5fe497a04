"""Training pairs, read through the `competition` readers (the valid gallery is decoded by
`infra.gallery`, as predict decodes it).

The dataset holds ids, texts and the TSV's offset index only; DataLoader workers decode images
by id with `pread`. Batches are full (drop_last): the contrastive loss wants a constant batch
and DDP's feature gathering needs equal batches on every rank. Workers persist across epochs;
the epoch reaches them with every index (`EpochSampler`).

Throughput per worker, measured by `muge bench train` on the sample's 224 px JPEGs on one core of
the 2-core development CPU: the cnclip preset's sample path (decode, squash, tokenize, collate;
no augmentation) 0.76 ms = 1,314 samples/s, the bert-convnext preset's (crop, colour jitter,
flip) 2.79 ms = 358 samples/s. A loop at S samples/s needs about S / that rate workers (the
bench prints it for its step): 2,400 samples/s takes 2 workers for cnclip, 7 for bert-convnext.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from competition import ImageTSV, MugeDataError, read_queries
from infra.gallery import shared_memory_problem

from .config import Config, data_seed
from .transform import augment_image, augment_text

log = logging.getLogger(__name__)


class PairDataset(Dataset):
    """(query, positive image) pairs: one per ground-truth id of every train query."""

    def __init__(self, queries_path: str, tsv_path: str, cfg: Config):
        queries = read_queries(queries_path, require_ids=True)
        self.tsv = ImageTSV(tsv_path)
        # Everything per pair or per query lives in numpy arrays, texts as one UTF-8 buffer:
        # forked workers share these pages, where lists of Python objects would be copied
        # page by page as their reference counts change (the "DataLoader memory leak").
        encoded = [q.text.encode("utf-8", "surrogatepass") for q in queries]  # a lone surrogate is valid JSON
        self.text_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.text_offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.text_offsets[1:])
        counts = np.array([len(q.item_ids) for q in queries], dtype=np.int64)
        self.query_index = np.repeat(np.arange(len(queries), dtype=np.int64), counts)
        self.image_ids = np.fromiter((i for q in queries for i in q.item_ids), dtype=np.int64, count=int(counts.sum()))
        if cfg.data.limit_pairs:
            self.query_index = self.query_index[:cfg.data.limit_pairs]
            self.image_ids = self.image_ids[:cfg.data.limit_pairs]
        missing = np.flatnonzero(~self.tsv.contains_all(self.image_ids))
        if len(missing):
            q, img = queries[self.query_index[missing[0]]], int(self.image_ids[missing[0]])
            raise MugeDataError(queries_path, f"query {q.query_id}: image {img} is not in {tsv_path} "
                                              f"({len(missing)} such pairs)", q.line)
        self.query_ids = np.array([q.query_id for q in queries], dtype=np.int64)[self.query_index]
        self.aug, self.size, self.rule = cfg.data.augment, cfg.data.image_size, cfg.data.resize_rule
        self.skip_bad = cfg.data.skip_bad_images
        self.seed = data_seed(cfg.train)
        self.epoch = 0

    def text(self, query: int) -> str:
        start, end = self.text_offsets[query], self.text_offsets[query + 1]
        return self.text_bytes[start:end].tobytes().decode("utf-8", "surrogatepass")

    def texts(self, n: int) -> list[str]:
        """The first `n` queries' texts."""
        return [self.text(i) for i in range(min(n, len(self.text_offsets) - 1))]

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: int | tuple[int, int]):
        """`key`: a pair index (this dataset's `epoch`), or (epoch, index) from `EpochSampler`."""
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        for attempt in range(16):  # a bad image (with skip_bad_images) is replaced by the next pair
            j = (i + attempt) % len(self)
            rng = np.random.default_rng([self.seed, epoch, j])
            try:
                img = self.tsv.load(int(self.image_ids[j]))
            except MugeDataError as err:
                if not self.skip_bad:
                    raise
                log.warning("skipping %s", err)
                continue
            pixels = augment_image(img, self.aug, self.size, self.rule, rng)
            text = augment_text(self.text(self.query_index[j]), self.aug, rng)
            return pixels, text, self.image_ids[j], self.query_ids[j]
        raise MugeDataError(self.tsv.path, f"16 consecutive undecodable images from pair {i}")


class EpochSampler(DistributedSampler):
    """A DistributedSampler whose indices carry their epoch, `(epoch, i)`: persistent workers keep
    the dataset copy they started with and would never see an epoch set on the main process's."""

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, i) for i in super().__iter__())


class Collate:
    """Samples -> one batch of tensors; text padded to the batch's longest, or always to `pad_to`
    (a compiled step then sees one shape and never recompiles)."""

    def __init__(self, tokenizer, pad_to: int | None = None):
        self.tokenizer, self.pad_to = tokenizer, pad_to

    def __call__(self, batch):
        pixels, texts, image_ids, query_ids = zip(*batch)
        ids, mask = self.tokenizer(texts, pad_to=self.pad_to)
        return {"pixels": torch.from_numpy(np.stack(pixels)), "input_ids": torch.from_numpy(ids),
                "attention_mask": torch.from_numpy(mask), "image_ids": torch.as_tensor(np.array(image_ids)),
                "query_ids": torch.as_tensor(np.array(query_ids))}


def _worker_init(_):
    torch.set_num_threads(1)


def train_loader(dataset: PairDataset, tokenizer, cfg: Config, rank: int, world: int, device,
                 pad_to: int | None = None) -> DataLoader:
    sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=data_seed(cfg.train),
                           drop_last=True)
    if len(dataset) // world < cfg.train.batch_size:
        raise ValueError(f"{len(dataset)} pairs over {world} process(es) do not fill one batch of "
                         f"{cfg.train.batch_size}; lower train.batch_size")
    workers = cfg.data.workers
    problem = shared_memory_problem() if workers else None
    if problem:  # the workers hand each batch over in shared memory: torch would fail at the first one
        log.warning("data.workers=%d: the loader's workers hand batches over in shared memory, which cannot be "
                    "created here (%s): loading in this process instead, slower; give the machine writable shared "
                    "memory (docker run --shm-size=2g) to use the workers", workers, problem)
        workers = 0
    return DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True,
                      num_workers=workers, collate_fn=Collate(tokenizer, pad_to), worker_init_fn=_worker_init,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None)


def stop_workers(loader: DataLoader) -> None:
    """Stop a loader's persistent workers now. Left to the loader's collection (after a failed
    run, at interpreter exit) each would be waited for up to 5 s while it decodes the batches
    already prefetched for it."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is None or not hasattr(iterator, "_shutdown_workers"):
        return
    for worker in getattr(iterator, "_workers", []):
        if worker.is_alive():
            worker.terminate()
    iterator._shutdown_workers()
    loader._iterator = None
