# The two set-up commands: `make demo` (the whole pipeline on synthetic data) and `make test`;
# `make app` opens the demo run in the browser viewer (making the demo run first when it is missing).
PYTHON ?= python3

.PHONY: install demo test bench app

install:
	$(PYTHON) -m pip install -q -r requirements.txt

demo: install
	$(PYTHON) run_pipeline.py --demo

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) bench/run_all.py

app: install
	@test -f runs/demo/final_classifier.pth || $(PYTHON) run_pipeline.py --demo
	$(PYTHON) app.py --output-dir runs/demo
