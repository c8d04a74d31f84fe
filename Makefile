# One venv for everything; every target that needs it depends on it, so
# `make demo` and `make test` work on a fresh machine with no other step.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test demo bench lint format deploy clean emulators-check lock

venv: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

emulators-check:
	@bash scripts/check_emulators.sh

test: venv emulators-check
	bash scripts/ensure_chromium.sh
	$(VENV)/bin/ruff check conftest.py shared ops tools functions infra tests bench
	$(VENV)/bin/pytest -q

demo: venv emulators-check
	$(VENV)/bin/l2cache demo

bench: venv emulators-check
	for b in $(BENCHES); do $(PY) $$b || exit 1; done

BENCHES := bench/features.py bench/worker.py bench/lookup.py bench/lookup_big.py bench/pipeline.py bench/cold_start.py bench/dispatch.py bench/scale.py

# Per-function locks: functions/<name>/requirements.in (direct deps) -> requirements.txt
# (every transitive package pinned with hashes, constrained by the repository's pins), the
# file that goes into the deploy archive. Run after changing a .in file or requirements.txt.
LOCK_FUNCTIONS := compute_chunk lookup on_edit

lock: venv
	for f in $(LOCK_FUNCTIONS); do \
	  (cd functions/$$f && $(CURDIR)/$(VENV)/bin/uv pip compile -q --python-version 3.11 \
	    --python-platform linux --generate-hashes --custom-compile-command "make lock" \
	    -c ../../requirements.txt requirements.in -o requirements.txt) || exit 1; \
	done

# Unit prices (ops/l2cache_ops/prices.yaml) from the Cloud Billing Catalog API; needs
# L2CACHE_BILLING_API_KEY or GOOGLE_APPLICATION_CREDENTIALS (fails, changing nothing, without).
.PHONY: prices
prices: venv
	$(VENV)/bin/l2cache prices refresh --out ops/l2cache_ops/prices.yaml

lint: venv
	$(VENV)/bin/ruff check conftest.py shared ops tools functions infra tests bench
	$(VENV)/bin/ruff format --check conftest.py shared ops tools functions infra tests bench

format: venv
	$(VENV)/bin/ruff format conftest.py shared ops tools functions infra tests bench
	$(VENV)/bin/ruff check --fix conftest.py shared ops tools functions infra tests bench

deploy: venv
	@command -v pulumi >/dev/null || { echo "deploy needs the pulumi CLI: https://www.pulumi.com/docs/install/" >&2; exit 1; }
	cd infra && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" pulumi up

clean:
	rm -rf $(VENV) var .pytest_cache
