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

demo: setup
	$(BIN)/cgwgan main

lint: setup
	$(BIN)/ruff check lib assets orchestration tests benchmarks

test: setup browser-deps
	$(BIN)/ruff check lib assets orchestration tests benchmarks
	$(BIN)/python -m pytest
