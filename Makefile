# The two commands of the README. Each installs what it needs into .venv first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test
$(VENV)/installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/installed
	$(VENV)/bin/mcalc demo

test: $(VENV)/installed
	$(VENV)/bin/ruff check mcalc tests examples benchmarks
	$(VENV)/bin/pytest -q -p no:cacheprovider
