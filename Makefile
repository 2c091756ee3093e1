# User-facing targets: `make test` and `make demo`. Helpers: install, clean.
SHELL := /bin/bash
VENV_PY := .venv/bin/python
THREADS ?= 2
PYTEST_ARGS ?=

.PHONY: demo test install clean

install:
	./scripts/bootstrap.sh

# pytest exit code 5 (no tests collected) is a failure like any other.
test: install
	@rc=0; OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) $(VENV_PY) -m pytest -q tests $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; exit $$rc

demo: install
	OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) $(VENV_PY) -m ibert_plugin.demo

clean:
	rm -rf build *.egg-info .pytest_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf
