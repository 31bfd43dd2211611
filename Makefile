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

BROWSER_DEPS := tests/browser/node_modules/.installed-$(shell cat tests/browser/package-lock.json 2>/dev/null | sha1sum | cut -c1-12)
WEB_DEPS := service/web/node_modules/.installed-$(shell cat service/web/package-lock.json 2>/dev/null | sha1sum | cut -c1-12)
DEPLOY_DEPS := tests/deploy/node_modules/.installed-$(shell cat tests/deploy/package-lock.json 2>/dev/null | sha1sum | cut -c1-12)

.PHONY: install web browser deploy-deps test test-fast demo serve worker openapi bench clean

$(STAMP): pyproject.toml constraints-cpu.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing into $(VENV) (first run: a few minutes)…"
	@$(PIP) --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	@set -o pipefail; $(PIP) -c constraints-cpu.txt $(TORCH_CPU) 2>&1 | { grep -v "^WARNING: Location" || true; }
	@set -o pipefail; $(PIP) -c constraints-cpu.txt -e '.[test,worker,gpu]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

# The web page's OpenSeadragon (served at /web/openseadragon/), from the npm registry at the version
# service/web/package-lock.json pins; never from a CDN. `serve` and `test` need it.
$(WEB_DEPS): service/web/package.json service/web/package-lock.json
	@command -v npm >/dev/null || { echo "npm is missing: install Node.js and npm (Debian: apt-get install npm)"; exit 1; }
	@cd service/web && npm ci --silent --no-audit --no-fund
	@rm -f service/web/node_modules/.installed-*
	@touch $@

web: $(WEB_DEPS)

# The browser test's parts: Debian's Chromium (driven by Playwright, which downloads no browser) and the
# real OpenSeadragon from the npm registry, at the version package-lock.json pins.
APT := $(if $(filter 0,$(shell id -u)),,sudo )apt-get
$(BROWSER_DEPS): tests/browser/package.json tests/browser/package-lock.json
	@command -v chromium >/dev/null || { echo "Installing Debian's chromium…"; \
	  $(APT) install -y -qq chromium >/dev/null || \
	  { $(APT) update -qq && $(APT) install -y -qq chromium >/dev/null; }; }
	@cd tests/browser && npm ci --silent --no-audit --no-fund
	@rm -f tests/browser/node_modules/.installed-*
	@touch $@

browser: $(BROWSER_DEPS)

# The deployment tests' schema: the Compose specification's JSON schema, bundled by dclint on the npm registry
# (no container engine here; the Kubernetes schemas come with kubernetes-validate, a test extra).
$(DEPLOY_DEPS): tests/deploy/package.json tests/deploy/package-lock.json
	@cd tests/deploy && npm ci --silent --no-audit --no-fund
	@rm -f tests/deploy/node_modules/.installed-*
	@touch $@

deploy-deps: $(DEPLOY_DEPS)

test: install web browser deploy-deps
	$(PY) -m pytest -q -ra

test-fast: install web browser deploy-deps
	$(PY) -m pytest -q -ra -m "not integration and not slow"

demo: install
	$(PY) -m slidesynth.demo

serve: install web
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
	rm -rf $(VENV) data .pytest_cache tests/browser/node_modules service/web/node_modules tests/deploy/node_modules
