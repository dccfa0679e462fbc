# Slimstore developer commands. Every target sets itself up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# `make run HOST=0.0.0.0 PORT=9000` (default $SLIM_HOST / $SLIM_PORT, else 127.0.0.1:8000).
# Plain `=`, not `?=`: a shell's own $HOST (zsh sets it to the machine name) must not leak in.
# Binding beyond loopback needs API keys (docs/security.md).
HOST = $(or $(SLIM_HOST),127.0.0.1)
PORT = $(or $(SLIM_PORT),8000)

.PHONY: run test test-fast bench lint format system-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian packages the browser tests need (no browser download: Debian's chromium).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "install Debian's chromium for the browser tests"; fi; }

run: $(STAMP)
	$(VENV)/bin/slim serve --host $(HOST) --port $(PORT)

test: $(STAMP) system-deps
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# Every fixture's recipe and table (hours on two cores; fixtures are cached in
# $SLIM_BENCH_CACHE and the fidelity grids resume from the rows they have):
# full fine-tunes (fp32, their bf16 casts, one trained under bf16 autocast), LoRA adapters,
# a causal LM, and lossless on bf16 against ZipNN and lmz.
bench: $(STAMP)
	$(PY) -m bench fidelity
	$(PY) -m bench fidelity --grid tasks
	$(PY) -m bench fidelity --grid tasks --precision bf16 --tasks tweets rotten_tomatoes wordnet_nouns wordnet_verbs
	$(PY) -m bench fidelity --grid tasks --precision bf16-trained --tasks wordnet_nouns
	$(PY) -m bench lora
	$(PY) -m bench causal-lm
	$(PY) -m bench lossless-bf16 --out bench/results/lossless-bf16-full

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
