# muge-retrieval: every target installs what it needs (`setup`) and skips what is up to date.
# DATA=/path/to/Multimodal_Retrieval points the chain at the real MUGE files.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MUGE   := $(VENV)/bin/muge
STAMP  := $(VENV)/.setup-stamp

DATA   ?= data/sample
CONFIG ?= configs/sample.yaml
RUN    ?= runs/$(basename $(notdir $(CONFIG)))
BUNDLE ?= bundles/$(notdir $(RUN))
NPROC  ?= 1
SET    ?=

.PHONY: setup sample train export test clean help
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

# -- train -------------------------------------------------------------------------------------
# NPROC>1 launches torchrun (DDP); SET="train.epochs=3 data.workers=8" overrides config keys.
train: $(RUN)/best.pt
$(RUN)/best.pt: $(STAMP) $(CONFIG) | $(DATA)/MR_train_queries.jsonl
ifeq ($(NPROC),1)
	$(MUGE) train --config $(CONFIG) --data $(DATA) --out $(RUN) $(foreach s,$(SET),--set $(s))
else
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m train.cli --config $(CONFIG) --data $(DATA) \
		--out $(RUN) $(foreach s,$(SET),--set $(s))
endif

# -- export ------------------------------------------------------------------------------------
export: $(BUNDLE)/manifest.json
$(BUNDLE)/manifest.json: $(RUN)/best.pt
	$(MUGE) export $(RUN) --out $(BUNDLE) --data $(DATA)

# -- checks ------------------------------------------------------------------------------------
# pytest exits 5 when it collects nothing; that fails here too.
test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf data/sample runs bundles submissions
