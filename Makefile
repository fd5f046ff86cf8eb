# simral — the two commands: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= ./simral-data
DICOM_PORT ?= 11112
HTTP_PORT ?= 8080
APT_TEST_PACKAGES := dcmtk orthanc orthanc-dicomweb postgresql chromium dicom3tools rsyslog rsyslog-openssl fonts-dejavu-core xorriso haproxy strace
# The prebuilt OHIF viewer (npm @ohif/app, only its dist/ folder), served by simral under /viewer.
OHIF_VERSION := 3.13.2
OHIF_INTEGRITY := sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==
OHIF_DIR := $(VENV)/share/simral/ohif
OHIF_STAMP := $(VENV)/.ohif-$(OHIF_VERSION)
# The suite runs in two pytest-xdist workers, each test file in one worker (its module fixtures —
# a running simral, Orthanc, PostgreSQL — are started once); `make test PYTEST_WORKERS=` runs serially.
# --no-loadscope-reorder: files are handed out in collection order (tests/conftest.py puts the longest
# first), not by decreasing number of tests, which left a 2-test, minutes-long file for the end.
PYTEST_WORKERS ?= -n 2 --dist loadfile --no-loadscope-reorder
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install run test test-deps lint typecheck bench hardening clean lock audit audit-pins

install: $(STAMP) $(OHIF_STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-virtualenv -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Only the package tarball is fetched (no dependency tree); npm checks it against the registry's
# integrity and we check it against the pinned one before extracting package/dist/.
$(OHIF_STAMP): | $(STAMP)
	@command -v npm >/dev/null || { echo "installing npm (Debian) to fetch the OHIF viewer"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null; }
	rm -rf $(VENV)/ohif-download $(OHIF_DIR) && mkdir -p $(VENV)/ohif-download $(OHIF_DIR)
	cd $(VENV)/ohif-download && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null
	$(BIN)/python -c 'import base64, hashlib, sys; \
	  got = "sha512-" + base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode(); \
	  sys.exit(0 if got == sys.argv[2] else f"OHIF tarball integrity mismatch: {got}")' \
	  $(VENV)/ohif-download/ohif-app-$(OHIF_VERSION).tgz '$(OHIF_INTEGRITY)'
	tar -xzf $(VENV)/ohif-download/ohif-app-$(OHIF_VERSION).tgz -C $(OHIF_DIR) --touch --strip-components=2 package/dist
	test -s $(OHIF_DIR)/index.html
	rm -rf $(VENV)/ohif-download $(VENV)/.ohif-*
	touch $@

# The OpenID provider the login tests run (npm oidc-provider, pinned by its package-lock.json).
OIDC_PEER := tests/oidc_provider/node_modules/.package-lock.json
$(OIDC_PEER): tests/oidc_provider/package-lock.json | $(OHIF_STAMP)
	npm ci --prefix tests/oidc_provider --no-audit --no-fund --prefer-offline --silent
	touch $@

# axe-core, which the accessibility tests inject into the portal's pages (pinned by its package-lock.json).
AXE_PEER := tests/axe/node_modules/.package-lock.json
$(AXE_PEER): tests/axe/package-lock.json | $(OHIF_STAMP)
	npm ci --prefix tests/axe --no-audit --no-fund --prefer-offline --silent
	touch $@

run: install
	$(BIN)/simral serve --data-dir $(DATA_DIR) --dicom-port $(DICOM_PORT) --http-port $(HTTP_PORT)

# Debian packages of the real peers the suite talks to (dcmtk, Orthanc, PostgreSQL).
test-deps:
	@missing=""; for p in $(APT_TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Known vulnerabilities of the pinned dependencies (PyPI's advisory data: needs the network, so it is
# not part of `make test`). --strict: a package that could not be looked up fails the audit instead of
# being skipped. Every finding must be fixed or explained in README.md, "Security review".
audit: install
	$(BIN)/pip-audit --requirement requirements.lock --no-deps --disable-pip --strict --progress-spinner off

# The same question where the index serves only PyPI's project documents (a mirror: pip-audit's
# version lookups answer 404): a pin is checked by its version's document, else by the project's
# when it is the latest release; a pin neither speaks for fails (tools/pin_audit.py).
audit-pins: install
	$(BIN)/python tools/pin_audit.py --requirements requirements.lock

lint: install
	$(BIN)/ruff check src tests bench fuzz tools
	$(BIN)/ruff format --check src tests bench fuzz tools

typecheck: install
	$(BIN)/mypy

test: install test-deps $(OIDC_PEER) $(AXE_PEER)
	$(BIN)/ruff check src tests bench fuzz tools
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 $(PYTEST_WORKERS) $(PYTEST_ARGS)

bench: install test-deps
	$(BIN)/python bench/dimse_bench.py
	$(BIN)/python bench/dicomweb_bench.py
	$(BIN)/python bench/viewer_bench.py
	$(BIN)/python bench/index_scale_bench.py
	$(BIN)/python bench/cluster_ingest_bench.py

# Sustained mixed load (issue 10): 10 minutes of C-STORE from 4 sites, 10 DICOMweb viewer sessions and
# HL7 ADT/order traffic on one simral; fails on any error, a /metrics total that differs from the
# clients' counts, or RSS growth above the bound. Not part of `make test`. LOAD_ARGS=--quick: 2 minutes.
.PHONY: load
load: install
	$(BIN)/python bench/mixed_load.py $(LOAD_ARGS)

# Coverage-guided fuzzing (atheris) of the DICOM ingest path, HL7 v2, STOW-RS, media import and
# the DICOM acceptor (fuzz/README.md): FUZZ_RUNS executions each, FUZZ_MAX_TIME seconds at most
# each (0: no limit), FUZZ_JOBS harnesses side by side (0: one per CPU), each in FUZZ_WORKERS
# processes sharing its corpus. `make test` replays the corpora and regressions.
FUZZ_RUNS ?= 1000000
FUZZ_MAX_TIME ?= 0
FUZZ_JOBS ?= 0
FUZZ_WORKERS ?= 1
hardening: install
	FUZZ_JOBS=$(FUZZ_JOBS) FUZZ_WORKERS=$(FUZZ_WORKERS) $(BIN)/python -m fuzz.run --runs $(FUZZ_RUNS) --max-total-time $(FUZZ_MAX_TIME)

# Regenerate the lock file from pyproject.toml (developers only; needs `uv`).
lock:
	uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) build src/*.egg-info
