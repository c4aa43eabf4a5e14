# Two commands: `make demo` and `make test` (README Quickstart). Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m efftrain.demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

clean:
	rm -rf $(VENV) runs .pytest_cache
