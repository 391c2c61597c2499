"""The first commands of a fresh checkout: `make venv` stops on a failed install and checks every
import, `make ui` before any run says there is no store, and `.ci/run` writes no global git
config (it sets a CI identity only where none is set)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

MAKE = shutil.which("make")
needs_make = pytest.mark.skipif(MAKE is None, reason="make is not installed")
ALL_IMPORTS = ["torch", "torchvision", "dvc", "mlflow", "cv2", "scipy", "pandas", "numpy", "matplotlib", "yaml",
               "tqdm", "pytest", "xdist", "psutil", "submitit", "pynvml"]


def _site_packages() -> str:
    import numpy
    return str(Path(numpy.__file__).resolve().parents[1])


@pytest.fixture
def project(tmp_path) -> Path:
    """The Makefile in a scratch folder with a real venv (no pip of its own; this interpreter's
    packages through a .pth file, so nothing is downloaded)."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "project-packages.pth").write_text(_site_packages() + "\n")
    return tmp_path


def _make(project: Path, *targets: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1")
    env.pop("MAKEFLAGS", None)
    env.update(extra_env or {})
    return subprocess.run([MAKE, "-s", f"VENV={project / 'venv'}", *targets], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)


@needs_make
def test_failed_pip_install_stops_make(project):
    (project / "requirements.txt").write_text("simformer-no-such-package-xyz==1.0\n")
    r = _make(project, "venv")
    assert r.returncode != 0
    assert "simformer-no-such-package-xyz" in r.stderr                  # pip's own message, not hidden
    assert "'pip install -r requirements.txt' into" in r.stderr and "failed" in r.stderr
    assert not (project / "venv" / ".installed").exists()


@needs_make
def test_install_checks_every_import(project):
    (project / "requirements.txt").write_text("numpy\n")                  # already satisfied: pip succeeds
    shadow = project / "shadow"
    shadow.mkdir()
    (shadow / "yaml.py").write_text("raise ImportError('yaml is broken in this venv')\n")
    r = _make(project, "venv", extra_env={"PYTHONPATH": str(shadow)})
    assert r.returncode != 0
    assert "yaml (ImportError: yaml is broken in this venv)" in r.stderr
    assert not (project / "venv" / ".installed").exists()
    r = _make(project, "venv")
    assert r.returncode == 0, r.stderr
    assert (project / "venv" / ".installed").is_file()
    listed = re.search(r"^IMPORTS :=(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert listed == ALL_IMPORTS


@needs_make
def test_make_ui_before_any_run_says_there_is_no_store(project):
    (project / "requirements.txt").write_text("numpy\n")
    assert _make(project, "venv").returncode == 0
    r = _make(project, "ui")
    assert r.returncode != 0
    assert f"no MLflow store yet ({project / 'mlflow.db'} does not exist)" in r.stderr
    assert "make repro" in r.stderr
    assert not (project / "mlflow.db").exists()                           # no empty store created


def test_ci_run_writes_no_global_git_config(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "GIT_CONFIG_NOSYSTEM": "1"})
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / ".ci", repo / ".ci")
    subprocess.run(["git", "init", "-q", str(repo)], check=True, env=env)
    r = subprocess.run([str(repo / ".ci" / "run"), "git", "var", "GIT_COMMITTER_IDENT"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("CI <ci@localhost>")
    assert sorted(p.name for p in home.iterdir()) == []                   # no ~/.gitconfig, nothing else
    assert "user.email" not in (repo / ".git" / "config").read_text()
    # an identity the user has set is left alone
    env.update({"GIT_AUTHOR_NAME": "Ann", "GIT_AUTHOR_EMAIL": "ann@example.org"})
    r = subprocess.run([str(repo / ".ci" / "run"), "git", "var", "GIT_AUTHOR_IDENT"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("Ann <ann@example.org>")
    assert "config --global" not in (ROOT / ".ci" / "run").read_text()
