# Set-up and everyday commands. Everything runs in a virtualenv (.venv) created here.
#   make demo    install, then run the whole pipeline (SFT -> RM -> PPO-ptx) on SmolLM2-135M-Instruct and the
#                embedded constraints task (fetches the model on first use; ~15 min on 2 CPU cores)
#   make test    install, then run the whole test suite (what CI runs)
#   make bench   install, then run the benchmarks and rewrite the README's performance tables
#   make wheel-check  build the wheel, install it into a fresh venv outside the checkout, run every command
#
# torch: an installed torch (visible through --system-site-packages) is used as it is; otherwise
# $(TORCH_SPEC) is installed (pip's configured index/find-links decide the build, e.g. a CPU wheel).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
export MAX_JOBS ?= 4
NATIVE_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: install demo test bench wheel-check lint clean gpu-check

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(VENV)/.deps: $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install "setuptools>=77" wheel ninja
	# the editable install only links the sources; the native extension is built in place below
	RLHF_FAST_SKIP_NATIVE=1 $(PY) -m pip install --no-build-isolation -e ".[test]"
	touch $@

# Rebuild the native extension in place whenever a C++/CUDA source or setup.py changes.
$(VENV)/.native: $(VENV)/.deps setup.py $(NATIVE_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

install: $(VENV)/.native

DEMO_OUT ?= runs/demo
demo: install
	$(VENV)/bin/rlhf-fast pipeline --output_dir $(DEMO_OUT)

test: install
	$(PY) -m pytest -q tests

$(VENV)/.bench-deps: $(VENV)/.deps
	RLHF_FAST_SKIP_NATIVE=1 $(PY) -m pip install --no-build-isolation -e ".[bench]"
	touch $@

# every suite, every mode, with fresh-process peak memory; then the inspection and estimate tables
bench: install $(VENV)/.bench-deps
	$(PY) -m rlhf_fast.bench.run --update-readme --memory

# what `make test` cannot see through its editable install: the wheel holds every module and every
# command works from it (.ci/wheel_smoke.sh; CI runs it before make test)
wheel-check: $(VENV)/.deps
	PY=$(PY) PYTHON=$(PYTHON) .ci/wheel_smoke.sh

# One unattended check on a GPU machine from a fresh copy (system python and its torch, no network, no venv):
# build for this GPU, the GPU tests, every benchmark, pipeline step times -> $(GPU_OUT)/gpu_check.{json,md}.
# DRY_RUN=1 rehearses every section on a CPU machine (this checkout's .venv when there is one).
GPU_OUT ?= $(or $(OUT),gpu-check-out)
GPU_CHECK_PYTHON ?= $(if $(filter 1,$(DRY_RUN)),$(if $(wildcard $(PY)),$(PY),$(PYTHON)),$(PYTHON))
gpu-check:
	$(GPU_CHECK_PYTHON) tools/gpu_check.py --out "$(GPU_OUT)" $(if $(filter 1,$(DRY_RUN)),--dry-run)

lint: install
	$(PY) -m ruff check rlhf_fast tests bench tools setup.py

clean:
	rm -rf build $(VENV) rlhf_fast/_C*.so *.egg-info
