# Two commands do all set-up:  `make repro` runs the pipeline, `make test` runs the tests.
# Both create the virtual environment from requirements.txt when it is missing, and put it
# first on PATH (DVC stages run `python` from PATH).
VENV ?= .venv
PYTHON ?= python3
# Every top-level package the pipeline, its stages and its tests import (checked after install).
IMPORTS := torch torchvision dvc mlflow cv2 scipy pandas numpy matplotlib yaml tqdm pytest xdist psutil submitit pynvml
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

define IMPORT_CHECK
import importlib, sys
bad = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:
        bad.append(f"{name} ({type(e).__name__}: {e})")
if bad:
    sys.exit("error: after installing requirements.txt these modules do not import: " + "; ".join(bad)
             + ". Fix the install (or run `make clean-venv`) and run make again.")
endef
export IMPORT_CHECK

.PHONY: repro test venv ui clean-venv

# A failed install stops here with pip's own message (its log is shown in full); only pip's
# harmless "is ignored: it is neither ..." notices are filtered from a successful install.
$(VENV)/.installed: requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@log=$$(mktemp); \
	if ! $(VENV)/bin/python -m pip install -q -r requirements.txt >$$log 2>&1; then \
		cat $$log >&2; rm -f $$log; \
		echo "error: 'pip install -r requirements.txt' into $(VENV) failed (see above); nothing was marked installed" >&2; \
		exit 1; \
	fi; \
	grep -v "is ignored: it is neither" $$log || true; rm -f $$log
	$(VENV)/bin/python -c "$$IMPORT_CHECK" $(IMPORTS)
	touch $@

venv: $(VENV)/.installed

repro: $(VENV)/.installed
	dvc repro

# The suite's test modules run on TEST_WORKERS processes (pytest-xdist; each module stays on one
# process, in file order, so a module's shared project is built once). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

# Before the first run there is no store: say so instead of opening an empty UI. MLflow 3 opens on
# a GenAI home page: the URLs printed first lead to the runs table and the models (docs/MLFLOW_UI.md).
ui: $(VENV)/.installed
	@test -f mlflow.db || { echo "error: no MLflow store yet ($(abspath mlflow.db) does not exist): run \`make repro\` (or \`dvc exp run\`) first; the first training run creates it." >&2; exit 1; }
	@python -m tools.mlflow_ui || true
	mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --host 127.0.0.1 --port 5000

clean-venv:
	rm -rf $(VENV)
