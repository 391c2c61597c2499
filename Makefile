# Two commands do all set-up:  `make repro` runs the pipeline, `make test` runs the tests.
# Both create the virtual environment from requirements.txt when it is missing, and put it
# first on PATH (DVC stages run `python` from PATH).
VENV ?= .venv
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: repro test venv ui clean-venv

$(VENV)/.installed: requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt 2>&1 | grep -v "is ignored: it is neither" || true
	$(VENV)/bin/python -c "import torch, torchvision, dvc, mlflow, cv2, scipy, pandas" 
	touch $@

venv: $(VENV)/.installed

repro: $(VENV)/.installed
	dvc repro

test: $(VENV)/.installed
	python -m pytest -q tests

ui: $(VENV)/.installed
	mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --host 127.0.0.1 --port 5000

clean-venv:
	rm -rf $(VENV)
