# Two commands set everything up on a fresh machine:
#   make train   create .venv, install, make sure Fashion-MNIST is present, train with the defaults
#   make test    same set-up, then the test suite
# Extra training flags: make train ARGS="--rounds 200"

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.installed

.PHONY: train test bench setup data

setup: $(STAMP) data

$(STAMP): setup.py pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 numpy tqdm matplotlib opacus==1.6.0 "flwr[simulation]==1.42.*" pytest pytest-benchmark pytest-rerunfailures "timm==1.0.*"
	$(PY) -m pip install -q -e .
	@touch $@

data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Fashion-MNIST missing: installing Debian package dataset-fashion-mnist"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing from $(FMNIST_DIR). Install it with:"; \
	    echo "  sudo apt-get install dataset-fashion-mnist"; \
	    exit 1; \
	  fi; \
	fi

# --resume: a second `make train` continues (or reads back) the run in runs/ instead of refusing its folder
train: setup
	$(PY) -m hyperfl_fast.train --resume $(ARGS)

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only
