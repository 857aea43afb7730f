# One command sets up and runs the main job; one command runs the tests (see README).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# ../shared holds the real MP data, M3GNet weights and VASP fixtures the tests use.
CGWGAN_SHARED ?= $(abspath ../shared)
export CGWGAN_SHARED

.PHONY: setup demo test lint browser-deps

setup: $(VENV)/.installed

# torch first, pinned: 2.13.0 is a CPU wheel; a looser pin pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Headless Chromium for the browser test (Debian's package; Playwright's own download does not work offline).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# GPAW (PBE DFT backend, lib/dft_gpaw.py) from Debian's packages: it runs under Debian's own
# /usr/bin/python3 as an external program; the venv never imports it.
.PHONY: dft-deps
dft-deps:
	@/usr/bin/python3 -c "import gpaw" >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gpaw gpaw-data >/dev/null)

# A C++ compiler for torch.compile's CPU kernels (CGWGAN_TORCH_COMPILE=energy and its test).
.PHONY: compiler-deps
compiler-deps:
	@command -v g++ >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null)

# PostgreSQL for the Dagster-instance test (tests/test_postgres_instance.py, orchestration/dagster_postgres.yaml):
# Debian's server binaries; the test runs its own throwaway server (initdb + postgres) as an unprivileged user.
.PHONY: pg-deps
pg-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null)

# The paper's surrogate (original TensorFlow M3GNet, pip m3gnet 0.2.4) in its own venv: it needs
# TensorFlow 2.15 (Python <= 3.11), numpy 1.x and an older pymatgen (lib/workers/). Measured here
# (2 cores): 3-6 min, 1.8 GB on disk. m3gnet goes in --no-deps: it declares `tensorflow`, whose
# full wheel would overwrite tensorflow-cpu's files.
TF_PY       ?= $(PY)
TF_VENV     ?= .venv-m3gnet-tf
TF_REQ      := lib/workers/requirements-m3gnet-tf.txt
TF_REQ_NODEPS := lib/workers/requirements-m3gnet-tf-nodeps.txt
.PHONY: tf-m3gnet
tf-m3gnet: $(TF_VENV)/.installed

$(TF_VENV)/.installed: $(TF_REQ) $(TF_REQ_NODEPS)
	rm -rf $(TF_VENV)
	$(TF_PY) -m venv $(TF_VENV)
	$(TF_VENV)/bin/python -m pip install -q --upgrade pip
	$(TF_VENV)/bin/python -m pip install -q -r $(TF_REQ)
	$(TF_VENV)/bin/python -m pip install -q --no-deps -r $(TF_REQ_NODEPS)
	$(TF_VENV)/bin/python -c "import m3gnet.models, tensorflow, numpy; assert numpy.__version__ < '2'"
	touch $@

demo: setup
	$(BIN)/cgwgan main

lint: setup
	$(BIN)/ruff check lib assets orchestration tests benchmarks
	$(BIN)/mypy

test: setup browser-deps tf-m3gnet dft-deps pg-deps compiler-deps
	$(BIN)/ruff check lib assets orchestration tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest
