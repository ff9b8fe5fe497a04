# muge-retrieval: every target installs what it needs (`setup`) and skips what is up to date.
# DATA=/path/to/Multimodal_Retrieval points the chain at the real MUGE files.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MUGE   := $(VENV)/bin/muge
STAMP  := $(VENV)/.setup-stamp

DATA   ?= data/sample

.PHONY: setup sample test clean help
.DEFAULT_GOAL := help

help:
	@echo "make setup | sample | test    (see README.md)"

# -- install -----------------------------------------------------------------------------------
# Re-runs only when setup.cfg / pyproject.toml change. torch and torchvision are pinned as a
# matching pair in setup.cfg; onnxruntime-gpu (never beside onnxruntime) runs on CPU as well.
setup: $(STAMP)
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

# -- data --------------------------------------------------------------------------------------
sample: data/sample/MR_train_queries.jsonl
data/sample/MR_train_queries.jsonl: $(STAMP) competition/sample.py
	$(MUGE) sample data/sample

# -- checks ------------------------------------------------------------------------------------
# pytest exits 5 when it collects nothing; that fails here too.
test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf data/sample runs bundles submissions
