# dpft — `make help` lists the targets. Every target installs what is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on disk on these machines (a plain `torch` would pull a CUDA build);
# a CUDA build: TORCH_INDEX=https://download.pytorch.org/whl/cu124 (the wheel index of your CUDA version)
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# pinned versions of every other package (`make lock` refreshes them); LOCK= installs the newest allowed instead
LOCK ?= constraints.txt
PIN := $(if $(LOCK),-c $(LOCK))
# The local data mirror, when this checkout sits beside it (../shared/data); else the Hugging Face Hub.
SHARED_DATA := $(abspath ../shared/data)
# With the mirror, models and tokenizers are read from it too: the Hub is not asked (HF_HUB_OFFLINE=1).
ifneq ($(wildcard $(SHARED_DATA)/README.md),)
export DPFT_DATA_DIR ?= $(SHARED_DATA)
export HF_HUB_OFFLINE ?= 1
endif
export TOKENIZERS_PARALLELISM ?= false
export WANDB_SILENT ?= true
PYTEST_ARGS ?=
# test processes (pytest-xdist; each test file stays on one worker, so module fixtures are built once); 0: none
TEST_WORKERS ?= 2
# `make mutants`: modules of the mutation scope to mutate (default: all of it), mutants tested at once
FILES ?=
MUTANT_JOBS ?= 1

.DEFAULT_GOAL := help
.PHONY: help install lock demo demo-ft test test-full lint format clean bench bench-quick gpu-check audit mutants docs

help: ## list the targets
	@grep -E '^[a-zA-Z_%-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'
	@echo "tables (make table-<name>, make report-<name>; sweeps/<name>.yaml):"
	@for f in sweeps/*.yaml; do printf "  %-16s %s\n" "$$(basename $$f .yaml)" "$$(sed -n 's/^description: *//p' $$f)"; done

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q $(PIN) -e ".[dev]"
	echo "$(or $(LOCK),none)" > $@

lock: ## refresh constraints.txt: resolve dpft's dependencies afresh (PyPI) and pin them (torch: TORCH_SPEC)
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	.lock-venv/bin/pip install -q ".[dev,bench,mutation,cluster]"
	(echo "# pip constraints: every package of dpft's CPU install and its extras but torch (TORCH_SPEC), as"; \
	 echo "# resolved by \`make lock\` on $$(date -u +%Y-%m-%d) with Python $$(.lock-venv/bin/python -c 'import platform; print(platform.python_version())')."; \
	 .lock-venv/bin/pip freeze --exclude-editable | grep -v -i -E '^(torch|dpft|triton|nvidia-[a-z0-9_-]+)( @ |==)') > $(or $(LOCK),constraints.txt)
	rm -rf .lock-venv

install: $(VENV)/.installed ## create .venv and install dpft with its test tools (TORCH_INDEX=... for a CUDA torch)

demo: install ## the privacy-utility table: MiniLM SST-2 512-shot, zero-shot and FT vs DP-SGD, DP-ZO at ε 2 and 8
	$(BIN)/dpft-sweep demo $(OVERRIDES)
	@echo "More: make table-cpu (three data seeds, more methods, CPU), make table-<paper> (GPU; make help lists them)"

demo-ft: install ## one non-private fine-tuning run of MiniLM on SST-2 512-shot, its row printed
	$(BIN)/dpft-train experiment=demo

test: install ## run the test suite (fast tests; what CI runs)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-full: install ## run every test, the slow ones too
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "" $(PYTEST_ARGS)

$(VENV)/.mutation-installed: $(VENV)/.installed
	$(BIN)/pip install -q $(PIN) -e ".[mutation]"
	touch $@

mutants: $(VENV)/.mutation-installed ## mutation testing of the privacy code (FILES=src/dpft/x.py to scope it; docs/testing.md)
	$(BIN)/python tools/mutants.py run --jobs $(MUTANT_JOBS) $(FILES)

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install -q $(PIN) -e ".[bench]"
	touch $@

bench: $(VENV)/.bench-installed ## speed/memory ratios over shapes, lengths, batches -> bench.json (long on CPU)
	$(BIN)/dpft-bench --out bench.json

bench-quick: $(VENV)/.bench-installed ## the OPT-125m / RoBERTa-base, batch 16, length 128 point only (minutes)
	$(BIN)/dpft-bench --quick --out bench.json

gpu-check: $(VENV)/.bench-installed ## on a GPU: tests/test_gpu.py, OPT-1.3B/6.7B runs, the GPU bench -> gpu-check.json
	$(BIN)/python -m dpft.bench.gpu_check --out gpu-check.json

audit: install ## privacy audit of DP-ZO, DPZero, DP-SGD, ANADP (opt-tiny) and of broken mechanisms -> audits/*.json
	$(BIN)/dpft-audit method=dpzo,dpzero,dpsgd,anadp --out audits
	$(BIN)/dpft-audit method=dpzo,dpsgd broken=no_noise,no_clip audit.trials=400 --out audits

table-%: install ## run sweeps/<name>.yaml (LAUNCHER=joblib N_JOBS=2 | slurm; OVERRIDES=...), skip finished cells, report
	$(BIN)/dpft-sweep $* $(if $(LAUNCHER),--launcher $(LAUNCHER)) $(if $(N_JOBS),hydra.launcher.n_jobs=$(N_JOBS)) $(OVERRIDES)

report-%: install ## rebuild the report of logs/tables/<name> from its results.json files (runs nothing)
	$(BIN)/dpft-report $(or $(DPFT_LOG_DIR),logs)/tables/$* --table $*

docs: install ## fill the measured tables of docs/*.md from the committed results (docs/bench/, docs/results/)
	$(BIN)/python tools/render_docs.py

lint: install ## ruff check
	$(BIN)/ruff check src tests tools

format: install ## ruff format + autofix
	$(BIN)/ruff check --fix src tests tools
	$(BIN)/ruff format src tests tools

clean: ## remove run outputs (logs/, outputs/, multirun/, audits/, mutants/)
	rm -rf logs outputs multirun audits mutants
