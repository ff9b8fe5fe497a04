"""Where the MUGE files live in a data directory: the layout of `Multimodal_Retrieval.zip`."""
from __future__ import annotations

import os

SPLITS = ("train", "valid", "test")


def split_paths(data_dir, split: str) -> tuple[str, str]:
    """(queries jsonl, images TSV) of `split`, whether or not they exist (writers use this)."""
    data_dir = os.fspath(data_dir)
    return os.path.join(data_dir, f"MR_{split}_queries.jsonl"), os.path.join(data_dir, f"MR_{split}_imgs.tsv")


def split_files(data_dir, split: str) -> tuple[str, str]:
    """`split_paths`, refusing a file that is not there (readers use this)."""
    paths = split_paths(data_dir, split)
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found (expected the MUGE layout in {data_dir})")
    return paths
