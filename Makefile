# Quickstart targets; each creates .venv idempotently and installs what it needs.
#   make bench   set up, build, run `llmembed-fast bench`
#   make test    set up, lint (ruff), build, run the C++ unit tests (ctest) and pytest (Triton through its interpreter),
#                then the Triton kernels' tests again under the newest supported Triton (test-compat)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
BENCH_ARGS ?=
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# wheels are not kept in ~/.cache/pip: the disk is shared and sometimes nearly full
export PIP_NO_CACHE_DIR := 1

CSRC := $(shell find csrc -type f 2>/dev/null) setup.py

.PHONY: venv deps build lint test test-cpp test-py test-compat bench bench-pytest clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and on its own: an unpinned torch pulled in by another package would be a multi-GB CUDA build.
$(VENV)/.deps-stamp: $(PY) requirements/test.txt requirements/test-nodeps.txt pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements/test.txt
	$(PY) -m pip install -q --no-deps -r requirements/test-nodeps.txt
	touch $@

deps: $(VENV)/.deps-stamp

$(VENV)/.build-stamp: $(VENV)/.deps-stamp $(CSRC)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.build-stamp

test-cpp: deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cmake --build build/cmake -j 2 >> build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ctest --test-dir build/cmake --output-on-failure

test-py: build
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q tests

lint: deps
	$(VENV)/bin/ruff check .

# The package supports Triton 3.6 - 3.9; .venv pins 3.6 (the GPU machine's). The Triton kernels' interpreter tests
# and their sm_90a code generation run again under the newest one: that Triton alone goes into a folder put first
# on PYTHONPATH, beside .venv's torch and everything else (a second venv with its own torch needed 2 GB of disk).
# The disk is shared and its free space varies: with too little free, test-compat says so and is skipped.
COMPAT_DIR ?= .triton-compat
COMPAT_TRITON ?= triton==3.9.0
COMPAT_TESTS ?= tests/test_pooling.py tests/test_contrastive.py tests/test_kernel_codegen.py
COMPAT_K ?= triton or single_loop or triangles or gemm or codegen
COMPAT_MIN_FREE_MB ?= 2500
# named for the version: another COMPAT_TRITON reinstalls
COMPAT_STAMP := $(COMPAT_DIR)/.stamp-$(subst =,,$(COMPAT_TRITON))
COMPAT_PATH = $(CURDIR)/$(COMPAT_DIR)$${PYTHONPATH:+:$$PYTHONPATH}

$(COMPAT_STAMP):
	rm -rf $(COMPAT_DIR)
	$(PY) -m pip install -q --no-deps --target $(COMPAT_DIR) "$(COMPAT_TRITON)"
	touch $@

test-compat: build
	@free_mb=$$(df -Pm . | awk 'NR==2 {print $$4}'); \
	if [ ! -e $(COMPAT_STAMP) ] && [ "$$free_mb" -lt $(COMPAT_MIN_FREE_MB) ]; then \
	  echo "test-compat: SKIPPED, $$free_mb MB free on this disk (installing $(COMPAT_TRITON) needs about $(COMPAT_MIN_FREE_MB) MB)"; \
	else \
	  $(MAKE) --no-print-directory $(COMPAT_STAMP) && \
	  PYTHONPATH="$(COMPAT_PATH)" $(PY) -c "import triton; print('test-compat: triton', triton.__version__, triton.__file__)" && \
	  PYTHONPATH="$(COMPAT_PATH)" TRITON_INTERPRET=1 $(VENV)/bin/pytest -q -p no:cacheprovider $(COMPAT_TESTS) -k "$(COMPAT_K)"; \
	fi

test: lint test-cpp test-py test-compat

bench: build
	$(VENV)/bin/llmembed-fast bench $(BENCH_ARGS)

bench-pytest: build
	$(VENV)/bin/pytest benchmarks --benchmark-only

clean:
	rm -rf build build-cmake.log *.egg-info llmembed_fast/_C*.so $(VENV)/.build-stamp $(COMPAT_DIR)
