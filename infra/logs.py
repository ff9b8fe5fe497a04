"""One logging setup for every entry point (`muge ...`, and `python -m train.cli` under torchrun).

In a terminal, progress bars redraw in place. Anywhere else (CI, `| tee`, a log file) every
redraw would be one more line of output, so bars then print at most every 30 seconds: tqdm
reads `TQDM_MININTERVAL` when it is imported, which is why `quiet_progress` runs first.
"""
from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY = ("onnxscript", "onnx_ir", "torch.onnx", "matplotlib", "PIL", "httpx", "urllib3", "onnxruntime.transformers")


def quiet_progress(seconds: int = 30) -> None:
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", str(seconds))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' per-load "Loading weights" bars


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT, datefmt="%H:%M:%S")
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    # transformers' load report (a table of every key it did not load): `model.weights.load_pretrained`
    # refuses weights that do not fit and names the keys itself
    logging.getLogger("transformers").setLevel(logging.ERROR)
