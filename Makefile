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

# An install is done once per venv, torch spec and pyproject.toml: a stamp file names the spec, and
# pyproject.toml (the dependencies) newer than the stamp redoes it. The package is installed editable,
# so changed sources need no reinstall; `make clean` starts over.
SPEC_ID := $(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)
DEMO_STAMP := $(VENV)/.installed-demo-$(SPEC_ID)
TEST_STAMP := $(VENV)/.installed-test-$(SPEC_ID)

# the demo's report draws its pictures with matplotlib (the draw extra); without it, tables only
install: $(DEMO_STAMP)
$(DEMO_STAMP): pyproject.toml | $(PY)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[draw]"
	rm -f $(VENV)/.installed-*  # another spec's stamp no longer describes this venv
	touch $@

install-test: $(TEST_STAMP)
$(TEST_STAMP): pyproject.toml | $(PY)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $@ $(DEMO_STAMP)  # the test extra holds the draw extra

demo: install
	$(PY) examples/deep_compression.py

# one pytest worker per core (pytest-xdist); a test module's tests stay on one worker, so its
# module-scoped fixtures are built once (xdist hands out the modules with the most tests first).
# anyio's pytest plugin is not used here. The whole suite skips pytest's assertion rewriting (about 8 s
# of every worker's collection here); run a failing test file alone for pytest's detailed assert messages.
# No test reads captured log records (caplog), and pytest's logging plugin attaches its handlers to every
# non-propagating logger of torch and transformers three times a test (0.8 ms a test; 4,000 empty tests
# took 9.0 s with it, 5.9 s without): it is off here, so log records go to stderr, which pytest captures.
test: install-test
	$(PY) -m pytest -n auto --dist loadscope --assert=plain -p no:anyio -p no:logging

# The transformers suite once more on 4.46, the newest release whose own fx tracer takes BERT, GPT-2,
# Llama and ViT (5.x has none): a second venv, since one venv holds one transformers.
HF4 := .venv-transformers4
HF4_STAMP := $(HF4)/.installed-test-$(SPEC_ID)
test-transformers4: $(HF4_STAMP)
	$(HF4)/bin/python -m pytest tests/frontends/test_transformers.py tests/frontends/test_transformers_more.py
$(HF4_STAMP): pyproject.toml
	$(PYTHON) -m venv $(HF4)
	$(HF4)/bin/python -m pip install -q "$(TORCH_SPEC)" "transformers==4.46.3" "tokenizers>=0.20,<0.21"
	$(HF4)/bin/python -m pip install -q -e ".[test]"
	rm -f $(HF4)/.installed-*
	touch $@

clean:
	rm -rf $(VENV) $(HF4) build *.egg-info
