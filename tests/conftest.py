import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(autouse=True)
def _few_threads():
    import torch
    torch.set_num_threads(1)
    yield


def module_dir(request, tmp_path_factory, name: str) -> Path:
    """A fresh directory for a module- or session-scoped fixture, removed when that scope ends
    unless a test failed meanwhile (then it is kept for inspection, like pytest's own
    ``tmp_path_retention_policy = failed``). The e2e projects hold DVC caches, MLflow
    artifacts and checkpoints (about 2.5 GB); keeping them all to the end of the session
    made the suite need 9 GB of free disk."""
    path = tmp_path_factory.mktemp(name)
    failed_before = request.session.testsfailed

    def _remove():
        if request.session.testsfailed == failed_before:
            shutil.rmtree(path, ignore_errors=True)
    request.addfinalizer(_remove)
    return path


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def file_params(overrides: dict | None = None) -> dict:
    """The params file's mapping (params.yaml sets every key: it is the only place a value
    lives) with ``overrides`` merged in, e.g. ``{"train": {"lr": 1e-3}}``."""
    import yaml
    return _merged(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides or {})


NEEDED_GIB = 4      # measured peak of the whole suite: 3.5 GB (the e2e projects' DVC caches, MLflow artifacts, checkpoints)


def _free_disk() -> tuple[Path, float]:
    import tempfile
    where = Path(tempfile.gettempdir())
    return where, shutil.disk_usage(where).free / 2**30


def pytest_report_header(config):
    where, free = _free_disk()
    return f"temporary files: {where} ({free:.1f} GiB free; the suite needs about {NEEDED_GIB} GiB)"


def pytest_sessionstart(session):
    """Say it up front (also under -q) when the temp dir cannot hold the e2e projects, instead
    of letting them fail later with torch's 'unexpected pos' or 'No space left on device'."""
    where, free = _free_disk()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if free < NEEDED_GIB and reporter is not None:
        reporter.write_line(f"WARNING: {where} has {free:.1f} GiB free; the e2e tests need about {NEEDED_GIB} GiB "
                            "(set TMPDIR to a larger disk)", yellow=True, bold=True)
