# `make demo` and `make test` work from a fresh clone: each creates .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,demo,plots]"
	touch $(STAMP)

install: $(STAMP)

# The second environment: the newest tensorflow-cpu (Keras 3) from the same
# package index, for the tests that load, predict and fit et-export
# --format=keras models the way a TF 2.16+ user does (tests/serving/
# test_keras_export.py). Built once; the stamp keeps reruns instant.
KERAS3_VENV := .venv-keras3
KERAS3_STAMP := $(KERAS3_VENV)/.installed

$(KERAS3_STAMP):
	test -x $(KERAS3_VENV)/bin/python || $(PYTHON) -m venv $(KERAS3_VENV)
	$(KERAS3_VENV)/bin/python -m pip install --quiet --upgrade tensorflow-cpu numpy pillow
	$(KERAS3_VENV)/bin/python -c "import keras; assert int(keras.__version__.split('.')[0]) >= 3, keras.__version__"
	touch $(KERAS3_STAMP)

.PHONY: keras3-venv
keras3-venv: $(KERAS3_STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# et-retrain on the digits arriving in rounds, with a round table (a few minutes).
.PHONY: demo-stream
demo-stream: $(STAMP)
	$(BIN)/python scripts/demo_stream.py

test: $(STAMP) $(KERAS3_STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

# Ours vs Keras fit, row by row (scripts/benchmark.py --help): 5 alternating
# repeats of whole processes per figure, hours on 2 cores; `--quick --only=ROW`
# previews one row. Results in docs/results/bench_*.json, then the README tables.
.PHONY: bench
bench: $(STAMP)
	$(BIN)/python scripts/benchmark.py
	$(BIN)/python scripts/results_tables.py --write

clean:
	rm -rf runs exports demo_data demo_backbone demo
