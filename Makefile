VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PORT ?= 8000
STAMP := $(VENV)/.installed
NODE_STAMP := tests/node/node_modules/.installed

.PHONY: run test test-unit test-protocol test-integration lint bench bench-full clean

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
	$(VENV)/bin/ruff check sseserver tests bench
	$(VENV)/bin/pytest -q -p no:cacheprovider

test-unit: $(STAMP)
	$(VENV)/bin/pytest -q tests/unit

test-protocol: $(STAMP)
	$(VENV)/bin/pytest -q tests/protocol

test-integration: $(STAMP) $(NODE_STAMP)
	$(VENV)/bin/pytest -q tests/integration

lint: $(STAMP)
	$(VENV)/bin/ruff check sseserver tests bench
	$(VENV)/bin/ruff format --check sseserver tests bench
	$(VENV)/bin/mypy sseserver

bench: $(STAMP)
	$(PY) -m bench.run --quick

bench-full: $(STAMP)
	$(PY) -m bench.run --full

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
