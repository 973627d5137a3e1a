# The two commands: `make demo` and `make test`. Both create .venv and install what they need.
# TORCH_SPEC picks the torch build: the default is the CPU wheel; pass another spec to change it.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test test-transformers4 install install-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# the demo's report draws its pictures with matplotlib (the draw extra); without it, tables only
install: $(PY)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[draw]"

install-test: $(PY)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"

demo: install
	$(PY) examples/deep_compression.py

# one pytest worker per core (pytest-xdist); a test module's tests stay on one worker, so its
# module-scoped fixtures are built once
test: install-test
	$(PY) -m pytest -n auto --dist loadscope

# The transformers suite once more on 4.46, the newest release whose own fx tracer takes BERT, GPT-2,
# Llama and ViT (5.x has none): a second venv, since one venv holds one transformers.
HF4 := .venv-transformers4
test-transformers4:
	$(PYTHON) -m venv $(HF4)
	$(HF4)/bin/python -m pip install -q "$(TORCH_SPEC)" "transformers==4.46.3" "tokenizers>=0.20,<0.21"
	$(HF4)/bin/python -m pip install -q -e ".[test]"
	$(HF4)/bin/python -m pytest tests/frontends/test_transformers.py

clean:
	rm -rf $(VENV) $(HF4) build *.egg-info
