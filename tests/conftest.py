"""Fixtures and hooks shared by every test module; plain helper functions are in tests/helpers.py."""
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from tests.helpers import ROOT, file_params, small_params  # noqa: E402,F401  (ROOT, file_params re-exported)


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


def _make_tiny_data(root: Path) -> Path:
    from pipeline.config import build_params
    from pipeline.data.splits import build_split, write_split
    from pipeline.data.synthetic import generate_dataset
    p = build_params(small_params())
    generate_dataset(root / "dataset", p.data.synthetic, p.base.seed, progress=False)
    split, index = build_split(root / "dataset", "synthetic", 1, progress=False)
    write_split(root / "split", split, index)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """``dataset/`` and ``split/`` of the small_params config, built by the functions the download
    and prepare stages call (read-only: tests that damage data copy it first)."""
    return _make_tiny_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An initialised (migrated) empty store, copied per test: creating one costs seconds."""
    pytest.importorskip("mlflow")
    from pipeline import tracking
    root = tmp_path_factory.mktemp("mlflow_template")
    tracking.open_client(root).search_experiments()
    return root / "mlflow.db"


@pytest.fixture
def store(tmp_path, mlflow_template, monkeypatch) -> Path:
    """A fresh MLflow store root for this test, found by the stages through $DVC_ROOT."""
    root = tmp_path / "store"
    root.mkdir()
    shutil.copy(mlflow_template, root / "mlflow.db")
    monkeypatch.setenv("DVC_ROOT", str(root))
    return root


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1 and a free port, with its own database and artifact folder."""
    import signal
    import subprocess
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = tmp_path / "server"
    srv.mkdir()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{srv}/server.db",
           "--artifacts-destination", str(srv / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=srv, stdout=subprocess.DEVNULL, stderr=open(srv / "server.log", "w"),
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not start: " + (srv / "server.log").read_text()[-2000:])
        yield url, srv
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.fixture
def no_internet(monkeypatch):
    """Any host other than the loopback fails name resolution, as on an offline machine."""
    real = socket.getaddrinfo

    def offline(host, *a, **k):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test: offline)")
        return real(host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", offline)


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
