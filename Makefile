# Quickstart targets; each creates .venv idempotently and installs what it needs.
#   make bench   set up, build, run `llmembed-fast bench`
#   make test    set up, lint (ruff), build, run the C++ unit tests (ctest) and pytest (Triton through its interpreter),
#                then the Triton kernels' tests again under the newest supported Triton (test-compat), the
#                transformers-based tests under the GPU machine's transformers 5.17 (test-compat-hf) and under
#                transformers 4.57 / 4.51 with sentence-transformers 5.1 / 5.7 (test-compat-hf4), and the
#                torch-path tests under the oldest supported torch, 2.11, the GPU machine's (test-compat-torch-min)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
BENCH_ARGS ?=
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# wheels are not kept in ~/.cache/pip: the disk is shared and sometimes nearly full
export PIP_NO_CACHE_DIR := 1

CSRC := $(shell find csrc -type f 2>/dev/null) setup.py

.PHONY: venv deps build lint test test-cpp test-py test-compat test-compat-hf test-compat-hf4 test-compat-torch test-compat-torch-min bench bench-pytest clean

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

# pytest-xdist workers: the tests run one intra-op thread each (tests/conftest.py), so two workers use both
# cores of the CI machine (9.7 -> 6.6 min there); PYTEST_WORKERS=0 runs them in one process.
PYTEST_WORKERS ?= 2

test-py: build
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q -n $(PYTEST_WORKERS) tests

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
	  PYTHONPATH="$(COMPAT_PATH)" TRITON_INTERPRET=1 $(VENV)/bin/pytest -q -n $(PYTEST_WORKERS) -p no:cacheprovider $(COMPAT_TESTS) -k "$(COMPAT_K)"; \
	fi

# The GPU machine runs transformers 5.17 and sentence-transformers 6.0.1 (.venv: the newest): the tests of the
# code built on them run again against that pair, installed alone into a folder put first on PYTHONPATH.
HF_COMPAT_DIR ?= .hf-compat
HF_COMPAT ?= transformers==5.17.0
HF_COMPAT_ST ?= sentence-transformers==6.0.1
# their huggingface_hub 1.x (over HTTP through httpx; .venv's 2.x uses httpx2, which transformers 5.17 cannot import)
HF_COMPAT_HUB ?= huggingface_hub==1.33.0 httpx==0.28.1 httpcore==1.0.9
HF_COMPAT_TESTS ?= tests/test_embedder.py tests/test_embedder_models.py tests/test_embedder_tokenize.py \
	tests/test_embedder_late_chunking.py tests/test_embedder_smollm2.py tests/test_embedder_distributed.py \
	tests/test_st_integration.py tests/test_st_loss_parity.py tests/test_training_integrations.py \
	tests/test_grad_cache.py tests/test_grad_cache_distributed.py tests/test_chunking.py tests/test_cli_encode.py \
	tests/test_quant.py tests/test_contrastive_st_parity.py tests/test_embedder_peft.py
# named by a hash of every pin: changing any of them reinstalls the folder
HF_COMPAT_STAMP = $(HF_COMPAT_DIR)/.stamp-$(shell echo '$(HF_COMPAT) $(HF_COMPAT_ST) $(HF_COMPAT_HUB)' | md5sum | cut -c1-12)

$(HF_COMPAT_STAMP):
	rm -rf $(HF_COMPAT_DIR)
	$(PY) -m pip install -q --no-deps --target $(HF_COMPAT_DIR) "$(HF_COMPAT)" "$(HF_COMPAT_ST)" $(HF_COMPAT_HUB)
	touch $@

test-compat-hf: build $(HF_COMPAT_STAMP)
	PYTHONPATH="$(CURDIR)/$(HF_COMPAT_DIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(PY) -c "import transformers as t, sentence_transformers as s; import huggingface_hub as h, accelerate as a; print('test-compat-hf: transformers', t.__version__, t.__file__, '/ sentence-transformers', s.__version__, '/ huggingface_hub', h.__version__, '/ accelerate', a.__version__)"
	PYTHONPATH="$(CURDIR)/$(HF_COMPAT_DIR)$${PYTHONPATH:+:$$PYTHONPATH}" TRITON_INTERPRET=1 $(VENV)/bin/pytest -q -n $(PYTEST_WORKERS) -p no:cacheprovider $(HF_COMPAT_TESTS)

# transformers 4 (with huggingface_hub < 1 and a datasets that imports it), the same tests in two more folders:
# - 4.57 (the last 4.x) with sentence-transformers 5.1, the last release before its 5.4 module layout;
# - 4.51, the oldest transformers supported, with sentence-transformers 5.7 (the new layout on transformers 4)
#   and accelerate 1.1, the oldest supported (4.57's Trainer itself needs 1.3).
HF4_HUB := huggingface_hub==0.36.2 datasets==4.1.1 pillow==13.0.0
HF4_COMPAT_ARGS := HF_COMPAT_DIR=.hf-compat-4 HF_COMPAT=transformers==4.57.6 \
	HF_COMPAT_ST=sentence-transformers==5.1.2 HF_COMPAT_HUB="$(HF4_HUB) tokenizers==0.22.2"
HF4_MIN_COMPAT_ARGS := HF_COMPAT_DIR=.hf-compat-4-min HF_COMPAT=transformers==4.51.3 \
	HF_COMPAT_ST=sentence-transformers==5.7.0 HF_COMPAT_HUB="$(HF4_HUB) tokenizers==0.21.4 accelerate==1.1.0"

test-compat-hf4:
	$(MAKE) --no-print-directory test-compat-hf $(HF4_COMPAT_ARGS)
	$(MAKE) --no-print-directory test-compat-hf $(HF4_MIN_COMPAT_ARGS)

test: lint test-cpp test-py test-compat test-compat-hf test-compat-hf4 test-compat-torch-min

# Other torch versions, each in its own venv and its own copy of the tracked files (an editable build here
# would replace .venv's extension with one built against the other torch). Their PyPI wheels are CUDA builds:
# ~5.5 GB of disk each, with their CUDA libraries and their own Triton.
# - test-compat-torch-min (part of `make test`): the torch-path tests under torch 2.11, the oldest supported
#   and the GPU machine's (with Triton 3.6), the extension built without CUDA kernels (test_cuda_compile compiles
#   them). Skipped, saying so, with less than TORCH_COMPAT_MIN_FREE_MB free.
# - test-compat-torch (opt-in): the whole suite under TORCH_COMPAT (default torch 2.14.1, the newest supported,
#   with Triton 3.8), the extension with its CUDA kernels where nvcc is found (TORCH_CUDA_ARCH_LIST, default
#   9.0; set CUDA_HOME to the toolkit, e.g. /usr/local/cuda, when nvcc is a wrapper outside it).
TORCH_COMPAT ?= torch==2.14.1
TORCH_COMPAT_DIR ?= .torch-compat-$(subst torch==,,$(TORCH_COMPAT))
TORCH_COMPAT_TESTS ?= tests
TORCH_COMPAT_K ?=
TORCH_COMPAT_NO_CUDA ?=
TORCH_COMPAT_MIN_FREE_MB ?= 9000
TORCH_COMPAT_MIN_TESTS ?= tests/test_compile.py tests/test_foundation.py tests/test_grad_cache.py \
	tests/test_contrastive.py tests/test_pooling.py tests/test_quant.py tests/test_training_integrations.py \
	tests/test_st_loss_parity.py
TORCH_COMPAT_STAMP := $(TORCH_COMPAT_DIR)/.stamp
TORCH_COMPAT_MIN ?= torch==2.11.0

$(TORCH_COMPAT_STAMP): requirements/test.txt requirements/test-nodeps.txt
	rm -rf $(TORCH_COMPAT_DIR)
	$(PYTHON) -m venv $(TORCH_COMPAT_DIR)/venv
	$(TORCH_COMPAT_DIR)/venv/bin/python -m pip install -q "$(TORCH_COMPAT)"
	grep -v '^triton' requirements/test.txt > $(TORCH_COMPAT_DIR)/requirements.txt  # keep the torch's own triton
	$(TORCH_COMPAT_DIR)/venv/bin/python -m pip install -q -r $(TORCH_COMPAT_DIR)/requirements.txt
	$(TORCH_COMPAT_DIR)/venv/bin/python -m pip install -q --no-deps -r requirements/test-nodeps.txt
	touch $@

test-compat-torch: $(TORCH_COMPAT_STAMP)
	rm -rf $(TORCH_COMPAT_DIR)/src && mkdir -p $(TORCH_COMPAT_DIR)/src
	git ls-files -z | xargs -0 cp --parents -t $(TORCH_COMPAT_DIR)/src
	cd $(TORCH_COMPAT_DIR)/src && TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}" \
	  LLMEMBED_FAST_NO_CUDA="$(TORCH_COMPAT_NO_CUDA)" ../venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	cd $(TORCH_COMPAT_DIR)/src && ../venv/bin/python -c "import llmembed_fast as lf; i = lf.info(); print('test-compat-torch:', i['versions'], i['extension'])"
	cd $(TORCH_COMPAT_DIR)/src && TRITON_INTERPRET=1 ../venv/bin/pytest -q -n $(PYTEST_WORKERS) -p no:cacheprovider \
	  $(TORCH_COMPAT_TESTS) $(if $(TORCH_COMPAT_K),-k "$(TORCH_COMPAT_K)")

test-compat-torch-min:
	@free_mb=$$(df -Pm . | awk 'NR==2 {print $$4}'); \
	if [ ! -e .torch-compat-$(subst torch==,,$(TORCH_COMPAT_MIN))/.stamp ] && [ "$$free_mb" -lt $(TORCH_COMPAT_MIN_FREE_MB) ]; then \
	  echo "test-compat-torch-min: SKIPPED, $$free_mb MB free on this disk ($(TORCH_COMPAT_MIN) with its CUDA libraries needs about $(TORCH_COMPAT_MIN_FREE_MB) MB)"; \
	else \
	  $(MAKE) --no-print-directory test-compat-torch TORCH_COMPAT=$(TORCH_COMPAT_MIN) TORCH_COMPAT_NO_CUDA=1 \
	    TORCH_COMPAT_TESTS="$(TORCH_COMPAT_MIN_TESTS)" TORCH_COMPAT_K="not triton"; \
	fi

bench: build
	$(VENV)/bin/llmembed-fast bench $(BENCH_ARGS)

bench-pytest: build
	$(VENV)/bin/pytest benchmarks --benchmark-only

clean:
	rm -rf build build-cmake.log *.egg-info llmembed_fast/_C*.so $(VENV)/.build-stamp $(COMPAT_DIR) $(HF_COMPAT_DIR) .hf-compat-4 .hf-compat-4-min .torch-compat-*
