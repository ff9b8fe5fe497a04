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

.PHONY: setup sample train export submit validate report browser test test-slow test-fast docs bench bench-quality \
	bench-lora bench-loss bench-scale gpu-check clean help
.DEFAULT_GOAL := help

help:
	@echo "make submit | validate | report | train | export | sample | test | test-slow | test-fast | docs | bench | bench-quality | bench-lora | bench-loss | bench-scale | gpu-check | setup   (see README.md)"

# -- install -----------------------------------------------------------------------------------
# Re-runs only when setup.cfg / pyproject.toml change. torch and torchvision are pinned as a
# matching pair in setup.cfg; onnxruntime-gpu (never beside onnxruntime) runs on CPU as well.
# cn-clip (Chinese-CLIP's code: its vocabulary, and the tests' reference) comes without its
# dependencies, which pin an lmdb this project does not use. --no-compile: Python compiles a
# module when it is first imported, not the thousands the packages ship and the project never
# imports (a fresh install took 2m18s instead of 3m36s on a 2-core CPU).
PIP := $(PY) -m pip install --quiet --no-compile --disable-pip-version-check
setup: $(STAMP)
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps "cn-clip==1.6.0"
	touch $@

# -- data --------------------------------------------------------------------------------------
sample: data/sample/MR_train_queries.jsonl
data/sample/MR_train_queries.jsonl: competition/sample.py | $(STAMP)
	$(MUGE) sample data/sample

# -- train -------------------------------------------------------------------------------------
# NPROC>1 launches torchrun (DDP); SET="train.epochs=3 data.workers=8" overrides config keys. A config
# newer than the run's best.pt trains the run again (--overwrite: the earlier run there is replaced).
train: $(RUN)/best.pt
ifeq ($(origin RUN),command line)
$(RUN)/best.pt:            # RUN=... reuses a trained run as it is
	@test -f $@ || (echo "$@ not found" && false)
else
$(RUN)/best.pt: $(CONFIG) | $(STAMP) $(DATA)/MR_train_queries.jsonl   # a reinstall never retrains
ifeq ($(NPROC),1)
	$(MUGE) train --config $(CONFIG) --data $(DATA) --out $(RUN) --overwrite $(foreach s,$(SET),--set $(s))
else
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m train.cli --config $(CONFIG) --data $(DATA) \
		--out $(RUN) --overwrite $(foreach s,$(SET),--set $(s))
endif
endif

# -- export ------------------------------------------------------------------------------------
export: $(BUNDLE)/manifest.json
ifeq ($(origin BUNDLE),command line)
$(BUNDLE)/manifest.json:   # BUNDLE=... reuses an exported bundle as it is
	@test -f $@ || (echo "$@ not found" && false)
else
$(BUNDLE)/manifest.json: $(RUN)/best.pt
	$(MUGE) export $(RUN) --out $(BUNDLE) --data $(DATA)
endif

# -- predict -----------------------------------------------------------------------------------
NAME       := $(notdir $(BUNDLE))
SUBMISSION := submissions/$(NAME)-test.jsonl
submit: $(SUBMISSION) validate
	@echo "submission: $(SUBMISSION)"
$(SUBMISSION): $(BUNDLE)/manifest.json $(DATA)/MR_test_queries.jsonl
	$(MUGE) predict --bundle $(BUNDLE) --data $(DATA) --split test --out $@
	$(MUGE) check-submission $(DATA)/MR_test_queries.jsonl $@

# Always re-scores (embeddings are cached, so a rerun takes about a second).
validate: $(BUNDLE)/manifest.json
	$(MUGE) predict --bundle $(BUNDLE) --data $(DATA) --split valid --out submissions/$(NAME)-valid.jsonl

# The valid predictions of `make validate` as one HTML page; OTHER=submissions/X-valid.jsonl
# compares them (A = OTHER, B = this bundle's).
OTHER  ?=
REPORT := reports/$(NAME)-valid.html
report: validate
	$(MUGE) report --queries $(DATA)/MR_valid_queries.jsonl --images $(DATA)/MR_valid_imgs.tsv \
		$(if $(OTHER),--pred $(OTHER)) --pred submissions/$(NAME)-valid.jsonl --run $(BUNDLE) --out $(REPORT)

# -- checks ------------------------------------------------------------------------------------
# The report test drives a real headless Chromium through Selenium: Debian's chromium and
# chromium-driver (and a CJK font for the screenshots), installed here when missing.
BROWSER_PKGS := chromium chromium-driver fonts-wqy-zenhei
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 \
	    || ! fc-list 2>/dev/null | grep -qi "wqy\|cjk"; then \
	  echo "installing $(BROWSER_PKGS) for the browser test"; \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends $(BROWSER_PKGS) >/dev/null; \
	fi

# The suite in tiers (setup.cfg's markers): `make test` is ruff, then every test but the slow set;
# `make test-slow` the slow set (whole chains and benches, compiles, launched processes: CI runs
# both, .ci/run); `make test-fast` a contributor's quick loop (ruff, then the tests that run no
# stage end to end: every package, in under three minutes). pytest exits 5 when it collects
# nothing, which fails too. PYTEST="..." adds pytest arguments.
PYTEST ?=
test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=15 -m "not slow" $(PYTEST)

test-slow: $(STAMP) browser
	$(PY) -m pytest -q --durations=15 -m slow $(PYTEST)

test-fast: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=10 -m "not slow and not stage" $(PYTEST)

# docs/cli.md's last section is every command's --help, and docs/config.md every config key (from the
# schema's own comments); `make test` fails when either is stale.
docs: $(STAMP)
	$(PY) -c "import muge_docs; muge_docs.write_reference()"

bench: $(BUNDLE)/manifest.json
	$(MUGE) bench topk
	$(MUGE) bench predict --bundle $(BUNDLE) --data $(DATA)
	$(MUGE) bench predict --pipeline --data $(DATA)
	$(MUGE) bench tsv --size-mb 1024
	$(MUGE) bench export
	$(MUGE) bench data
	$(MUGE) bench train --config $(CONFIG) --data $(DATA)

# What each quality feature is worth: trains on the hard sample (drawn into data/hard when missing)
# and scores the plain chain, TTA, re-ranking, EMA, ensembles and a soup on valid, as one table.
# ARGS="--pretrained DIR" adds a zero-shot row; ARGS="--reuse" keeps the runs already trained.
bench-quality: $(STAMP)
	$(MUGE) bench quality $(ARGS)

# LoRA against a full fine-tune from one start, the same epochs: a tiny Chinese-CLIP trained on the
# easy sample (data/sample) is the start, both fine-tune on the hard sample (data/hard), each drawn
# when missing; valid MR of each through the ONNX chain. The sweep: one factor at a time (targets,
# rank, the adapters' rate, rsLoRA, DoRA, LoRA+) from rank 8 on every linear layer at ten times the
# rate; train.lora's defaults are its cheapest row within 1 MR of the best (docs/benchmarks.md).
# ARGS="--reuse" keeps the runs already trained; ARGS="--start DIR" fine-tunes real weights.
bench-lora: $(STAMP)
	$(MUGE) bench lora --sweep --lora 8 --lora-set train.lora.targets=all-linear --lora-set train.lora.lr_ratio=10 \
		$(ARGS)

# The sigmoid loss against InfoNCE, full fine-tunes from bench-lora's start (shared: runs/bench-lora), at a
# batch of 32 and at the preset's.
bench-loss: $(STAMP)
	$(MUGE) bench loss --reuse $(ARGS)

# The Chinese-CLIP presets at their published shapes (random weights in cn_clip's released format):
# export, predict against cn_clip's own rankings, two training steps, training memory; each stage's
# wall time and peak RSS. About 40 minutes and 12 GB of disk under build/scale on a 2-core CPU.
# ARGS="--preset cnclip-vit-h14 --json out.json" picks presets and keeps the figures.
bench-scale: $(STAMP)
	$(MUGE) bench scale --lora 0 --lora 4 --memory-model train/memory_model.json $(ARGS)

# The whole chain at realistic shapes on this machine's GPU, as one table (random weights, no
# network). ARGS="--small" runs tiny shapes on a CPU; ARGS="--json out.json" keeps the figures.
ARGS ?=
gpu-check: $(STAMP)
	$(MUGE) bench gpu $(ARGS)

clean:
	rm -rf data/sample runs bundles submissions reports cache
