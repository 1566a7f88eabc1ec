# meshollama: the two commands a newcomer needs are `make run` and `make test`.
# Both install everything first (idempotent; the slow llama.cpp build is cached
# in .cache/wheels), so they work from a fresh clone with only Python >= 3.11,
# a C/C++ compiler and make.

VENV := .venv
PY := $(VENV)/bin/python
MESHOLLAMA := $(VENV)/bin/meshollama
ARGS ?=

.PHONY: install run test test-fast demo bench clean

install:
	bash scripts/install.sh

# Start a node: local Ollama if one answers on 127.0.0.1:11435, else the
# embedded llama.cpp engine with SmolLM2-135M, API on 127.0.0.1:11434.
run: install
	$(MESHOLLAMA) start $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

# Unit and p2p tests only (no multi-process or real-model tests).
test-fast:
	$(PY) -m pytest -q -m "not slow and not embedded" $(ARGS)

# Three embedded nodes on loopback (APIs on 11434, 11444, 11454) with a live
# load table, so you can watch routing; Ctrl-C stops them all.
demo: install
	$(PY) scripts/demo.py $(ARGS)

bench: install
	$(PY) benchmarks/run_all.py $(ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache build dist src/*.egg-info
