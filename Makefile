# The two commands of the README:
#   make bench   set everything up, build, run the quick benchmark suite on every device present
#   make test    set everything up, build, run the test suite
# Both create ./.venv on first use (or reuse the environment named by VENV=...).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
BENCH_ARGS ?= --quick
PYTEST_ARGS ?=

SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py

.PHONY: setup build test bench info clean

# Python deps. torch comes from PyPI as-is (a CUDA build on Linux x86-64); the extension links
# against it, which is why it is installed before, not by, the build. torchvision and timm are the
# test and benchmark extras (real-model checks of torchfast.nn.fuse), never runtime dependencies.
$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "torch>=2.6" "setuptools>=64" wheel ninja pytest numpy scipy hypothesis matplotlib torchvision timm
	touch $@

setup: $(VENV)/.deps

# --no-build-isolation: build against the torch installed above instead of downloading a second
# torch into a throwaway build environment (and it works offline). --no-deps: nothing to fetch.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

bench: build
	$(PY) benchmarks/run.py $(BENCH_ARGS)

info: build
	$(PY) -m torchfast.info

clean:
	rm -rf build torchfast/_C*.so $(VENV)/.built
