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

# Opt-in, not part of `make test`: real client programs against a node with the
# embedded model. Installs them first into venvs of their own under
# .cache/clients/ (idempotent; Open WebUI is about 7 GB and several minutes;
# Debian's chromium with apt-get when missing), re-records the light client
# libraries' requests into .cache/clients/results/recordings and says which
# differ from tests/clients/recordings, drives Open WebUI's page in headless
# Chromium (screenshot, logs and Open WebUI's requests in
# .cache/clients/results/openwebui/), then runs tests/clients.
.PHONY: test-clients
test-clients: install
	bash scripts/clients/setup.sh
	.cache/clients/light-venv/bin/python scripts/clients/record.py --out .cache/clients/results/recordings --compare tests/clients/recordings
	.cache/clients/openwebui-venv/bin/python scripts/clients/openwebui_e2e.py $(ARGS)
	$(PY) -m pytest -q tests/clients
