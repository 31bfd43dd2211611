# slidesynth — `make demo` and `make test` do all set-up on a fresh machine (Python 3.11, Linux).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Local and CI installs pin the CPU build of torch (an unpinned torch pulls gigabytes of CUDA);
# the GPU image (Dockerfile.gpu) installs a CUDA build instead.
TORCH_CPU := torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints-cpu.txt 2>/dev/null | sha1sum | cut -c1-12)
PIP := $(PY) -m pip install --quiet --disable-pip-version-check --progress-bar off

.PHONY: install test test-fast demo serve worker openapi bench clean

$(STAMP): pyproject.toml constraints-cpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing into $(VENV) (first run: a few minutes)…"
	@$(PIP) --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	@set -o pipefail; $(PIP) -c constraints-cpu.txt $(TORCH_CPU) 2>&1 | { grep -v "^WARNING: Location" || true; }
	@set -o pipefail; $(PIP) -c constraints-cpu.txt -e '.[test,gpu]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

test: install
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -ra -m "not integration and not slow"

demo: install
	$(PY) -m slidesynth.demo

serve: install
	$(VENV)/bin/slidesynth serve

worker: install
	$(VENV)/bin/slidesynth worker

openapi: install
	$(PY) -m service.openapi > openapi.yaml

bench: install
	$(PY) -m bench.writer
	$(PY) -m bench.decoder
	$(PY) -m bench.sampler

clean:
	rm -rf $(VENV) data .pytest_cache
