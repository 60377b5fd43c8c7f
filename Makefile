# The two set-up commands: `make demo` (the whole pipeline on synthetic data) and `make test`.
PYTHON ?= python3

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install -q -r requirements.txt

demo: install
	$(PYTHON) run_pipeline.py --demo

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) bench/run_all.py
