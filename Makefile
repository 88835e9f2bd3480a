VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PORT ?= 8000
STAMP := $(VENV)/.installed
NODE_STAMP := tests/node/node_modules/.installed

FUZZ_MINUTES ?= 30
FUZZ_EXAMPLES ?= 2000
FUZZ_TESTS := tests/protocol/test_fuzz_requests.py::test_fuzzed_requests_never_crash_hang_or_leak \
	tests/unit/test_sse_decode.py
SOAK_MINUTES ?= 30
# The same load on a server that keeps nothing: the RSS the budget comes on top of.
NO_HISTORY := --server-arg=--history-bytes=1 --server-arg=--resume-window-s=0

.PHONY: run test test-unit test-protocol test-integration lint bench bench-full soak fuzz clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,bench]'
	touch $(STAMP)

# The Vercel `ai` package for the UI-message-stream client test, from tests/node's lock.
$(NODE_STAMP): tests/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		cd tests/node && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error \
		&& touch node_modules/.installed; \
	else echo "npm not found: the Vercel ai client test will skip (and fail under CI=true)"; fi

run: $(STAMP)
	$(PY) -m sseserver --port $(PORT)

test: $(STAMP) $(NODE_STAMP)
	$(VENV)/bin/ruff check sseserver tests bench examples
	$(VENV)/bin/ruff format --check sseserver tests bench examples
	$(VENV)/bin/mypy sseserver tests bench examples
	$(VENV)/bin/pytest -q -p no:cacheprovider

test-unit: $(STAMP)
	$(VENV)/bin/pytest -q tests/unit

test-protocol: $(STAMP)
	$(VENV)/bin/pytest -q tests/protocol

test-integration: $(STAMP) $(NODE_STAMP)
	$(VENV)/bin/pytest -q tests/integration

lint: $(STAMP)
	$(VENV)/bin/ruff check sseserver tests bench examples
	$(VENV)/bin/ruff format --check sseserver tests bench examples
	$(VENV)/bin/mypy sseserver tests bench examples

bench: $(STAMP)
	$(PY) -m bench.micro
	$(PY) -m bench.run --quick
	$(PY) -m bench.scaleout
	$(PY) -m bench.outbox
	$(PY) -m bench.soak --minutes 1 --label no-history $(NO_HISTORY)
	$(PY) -m bench.soak --minutes 3

# Generations at half the process's capacity for SOAK_MINUTES: RSS must stay flat.
soak: $(STAMP)
	$(PY) -m bench.soak --minutes 2 --label no-history $(NO_HISTORY)
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES)

# A long randomised campaign over the property-based tests: rounds of FUZZ_EXAMPLES
# examples, each with a fresh seed, for FUZZ_MINUTES. A failure prints its example (and
# the seed to replay it with --hypothesis-seed); make it a fixed test.
fuzz: $(STAMP)
	@end=$$(( $$(date +%s) + $(FUZZ_MINUTES) * 60 )); round=0; \
	while [ $$(date +%s) -lt $$end ]; do \
		round=$$((round + 1)); seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' '); \
		echo "fuzz round $$round, seed $$seed"; \
		HYPOTHESIS_PROFILE=fuzz SSESERVER_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
			$(VENV)/bin/pytest -q -p no:cacheprovider --hypothesis-seed=$$seed \
			--hypothesis-show-statistics $(FUZZ_TESTS) || exit 1; \
	done; echo "fuzz: $$round rounds, no failure"

bench-full: $(STAMP)
	$(PY) -m bench.run --full

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
