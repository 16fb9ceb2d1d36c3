# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CT ?=
DEMO_OUT ?= demo-output

.PHONY: setup demo test benchmark clean

setup: $(VENV)/.installed

# torch is pinned to the CPU build on disk; a plain `torch` would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0" -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/livertumorseg demo -o $(DEMO_OUT) --overwrite $(if $(CT),--ct "$(CT)")

test: setup
	$(VENV)/bin/pytest

benchmark: setup
	$(PY) scripts/benchmark_engine.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
