# The two commands: `make demo` and `make test`. Both create .venv and install what they need.
# TORCH_SPEC picks the torch build: the default is the CPU wheel; pass another spec to change it.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test install install-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .

install-test: $(PY)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"

demo: install
	$(PY) examples/deep_compression.py

test: install-test
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
