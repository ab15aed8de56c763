# `make demo` and `make test` work from a fresh clone: each creates .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,demo]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Ours vs Keras fit, the inference limit, startup, serving, knobs (~30 min on
# 2 cores; `$(BIN)/python scripts/benchmark.py --quick` takes ~5). Tables on
# stdout, numbers in bench/results.json.
.PHONY: bench
bench: $(STAMP)
	$(BIN)/python scripts/benchmark.py

clean:
	rm -rf runs exports demo_data demo_backbone
