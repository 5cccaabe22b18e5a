# Two entry points for a fresh machine: `make report` (the pipeline on the embedded default) and
# `make test` (the test suite). Both create .venv if missing (torch==2.13.0 first, so nothing pulls a
# CUDA build), install the package editable with its C kernels, and are idempotent.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
LLAMACPP_STAMP := $(VENV)/.installed-llamacpp
ONNXRUNTIME_STAMP := $(VENV)/.installed-onnxruntime
# llama-cpp-python is built from source by pip (PyPI has no wheel); LLaVA/mtmd is not needed
LLAMACPP_CMAKE_ARGS := -DLLAVA_BUILD=OFF
TORCH_VERSION := 2.13.0
# Memory for --resources mem_mb: 80% of what is available now, so the jobs at once never hold more
# full-size model copies than fit in RAM.
MEM_MB := $(shell awk '/MemAvailable/ {printf "%d", $$2/1024*0.8}' /proc/meminfo 2>/dev/null || echo 4000)
# One job thread per core: `--cores 8` on a 2-core machine ran four jobs per core, whose statistics jobs then
# took 1.26-1.39x the CPU time they take alone (caches, context switches) and whose 2-thread dumps spun
# against the other jobs (bench/README.md, "make report at one job thread per core").
CORES ?= $(shell nproc 2>/dev/null || echo 2)
SNAKEMAKE_ARGS ?=
KERNEL_SOURCES := $(wildcard kernels_c/src/*.c kernels_c/include/*.h src/actdiff/kernels/_build.py setup.py)
export PATH := $(BIN):$(PATH)

.PHONY: setup setup-llamacpp setup-onnxruntime bytecode report test test-python test-isa test-c browser lint clean

setup: $(STAMP)

# the optional llama.cpp engine (issue: llama.cpp as a second engine); `make report` uses it when present
setup-llamacpp: $(LLAMACPP_STAMP)

$(LLAMACPP_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(BIN)/pip install -e '.[test,llamacpp]'
	$(BIN)/python -m actdiff.llamacpp.converter_script install
	$(BIN)/python -c 'import sys, actdiff.llamacpp as l; ok, why = l.available(); print(why); sys.exit(not ok)'
	@touch $(LLAMACPP_STAMP)

# the optional ONNX Runtime engine (issue 17: onnxruntime, onnx, onnxscript wheels); with llamacpp in the same
# pip call, so one resolution keeps both extras
setup-onnxruntime: $(ONNXRUNTIME_STAMP)

$(ONNXRUNTIME_STAMP): $(LLAMACPP_STAMP)
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(BIN)/pip install -e '.[test,llamacpp,onnxruntime]'
	$(BIN)/python -c 'import sys, actdiff.onnxrt as o; ok, why = o.available(); print(why); sys.exit(not ok)'
	@touch $(ONNXRUNTIME_STAMP)

$(STAMP): pyproject.toml $(KERNEL_SOURCES)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "$(TORCH_VERSION)")' 2>/dev/null \
	  || $(BIN)/pip install "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --upgrade "setuptools>=68" wheel "cffi>=1.16"
	$(BIN)/pip install -e '.[test]'
	@touch $(STAMP)

# The package byte-compiled once for the ~200 jobs of a report, each a new interpreter importing it: where
# PYTHONDONTWRITEBYTECODE is set (the CI machines set it) every job compiled it again, 0.2-0.3 s of each. A file
# edited later is recompiled by the import itself, so this never serves stale code. Quick when up to date.
bytecode: setup
	@$(BIN)/python -m compileall -q src/actdiff > /dev/null

report: setup bytecode
	@$(BIN)/python -c 'import actdiff.llamacpp as l; ok, why = l.available(); print("actdiff: llama.cpp engine " + ("included (" + why + ")" if ok else "NOT included: " + why))'
	@$(BIN)/python -c 'import actdiff.onnxrt as o; ok, why = o.available(); print("actdiff: ONNX Runtime engine " + ("included (" + why + ")" if ok else "NOT included: " + why))'
	$(BIN)/actdiff run --cores $(CORES) --resources mem_mb=$(MEM_MB) $(SNAKEMAKE_ARGS)

# test-c and test-isa run beside test-python, which keeps one of 2 cores busy on average (pipelines, Snakemake
# and SLURM waits): their output is printed after test-python's. The forced-ISA tests need the generated tiny
# model, so it is built first (two Snakemake runs building it at once would fail on Snakemake's lock).
TINY_MODEL := resources/models/tiny-nomic-moe
test: setup setup-llamacpp setup-onnxruntime browser bytecode
	@test -f $(TINY_MODEL)/config.json || $(BIN)/snakemake --cores 2 $(TINY_MODEL)/config.json
	@log=$$(mktemp); \
	( $(MAKE) --no-print-directory test-c test-isa > "$$log" 2>&1 ) & bg=$$!; \
	py=0; $(MAKE) --no-print-directory test-python || py=$$?; \
	other=0; wait $$bg || other=$$?; \
	echo "actdiff: output of test-c and test-isa (run beside test-python):"; cat "$$log"; rm -f "$$log"; \
	echo "actdiff: test-python exit $$py; test-c and test-isa exit $$other"; \
	[ $$py -eq 0 ] && [ $$other -eq 0 ]

# headless Chromium for the report test (Debian's package; Playwright drives it, it never downloads a browser)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y chromium; \
	  else echo "chromium is missing: run 'sudo apt-get install -y chromium'" >&2; exit 1; fi; }

test-c:
	$(MAKE) -C kernels_c test test-sanitize test-tsan test-python-sanitize PYTHON=$(BIN)/python

# under `make test` the optional parts must be there: their tests fail instead of skipping
test-python: bytecode
	ACTDIFF_REQUIRE_LLAMACPP=1 ACTDIFF_REQUIRE_ONNXRUNTIME=1 ACTDIFF_REQUIRE_SLURM=1 $(BIN)/python -m pytest --durations=15

# Every C kernel path this CPU runs besides the one the main run used (README: CPU requirements): the tests
# marked isa_paths (the kernel op suite, the determinism tests, the engine's fp32 parity on the CI prompts, the
# budget criterion) again with ACTDIFF_KERNELS_ISA forcing the path. An AVX-512 machine proves avx2 and scalar
# here; an AVX2 machine proves scalar (it cannot execute avx512, and says so in every pytest header).
test-isa:
	@main=$$(env -u ACTDIFF_KERNELS_ISA $(BIN)/python -c 'import actdiff.kernels as K; print(K.get_isa())'); \
	ran="$$main (main run)"; \
	for isa in $$($(BIN)/python -c 'import actdiff.kernels as K; print(*K.supported_isas())'); do \
	  [ "$$isa" = "$$main" ] && continue; \
	  echo "actdiff: kernel path $$isa forced (ACTDIFF_KERNELS_ISA=$$isa): tests marked isa_paths"; \
	  ACTDIFF_KERNELS_ISA=$$isa $(BIN)/python -m pytest -m isa_paths -p no:cacheprovider \
	    --parity-corpus tests/data/ci_prompts.tsv --durations=5 || exit 1; \
	  ran="$$ran, $$isa (forced)"; \
	done; \
	echo "actdiff: kernel paths tested on this CPU: $$ran"

lint: setup
	$(BIN)/ruff check src tests workflow bench
	$(BIN)/snakemake --lint

clean:
	rm -rf results .snakemake
