# The two set-up commands: `make install` and `make test`. `make demo` runs the whole pipeline on synthetic data
# (3-fold cross-validation, 3.5 min on 2 CPU cores, docs/speed.md);
# `make app` opens the demo run in the browser viewer (making the demo run first when it is missing).
# Installs use constraints.txt: the exact versions the suite last passed with (requirements.txt keeps ranges).
PYTHON ?= python3

.PHONY: install demo test bench app lock

install:
	$(PYTHON) -m pip install -q -r requirements.txt -c constraints.txt

demo: install
	$(PYTHON) run_pipeline.py --demo

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) bench/run_all.py

app: install
	@test -f runs/demo/final_classifier.pth || $(PYTHON) run_pipeline.py --demo
	$(PYTHON) app.py --output-dir runs/demo

# Re-resolve requirements.txt in a brand-new virtual environment and write what it installed to constraints.txt.
# Run `make test` afterwards: the file then records versions the suite has passed with.
lock:
	bash .ci/lock
