"""The train stage when its MLflow store is unusable from the start (it fails before training,
naming the store) or breaks after the run started (it warns, naming the store, and completes):
the trouble policy of pipeline/tracking.py, each case exercised by injecting the fault. The
RunTracker's own errors are checked in test_tracking.py."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, run_stage, runs_in_store, small_params, train_argv, write_params


@pytest.mark.parametrize("trouble, says", [("db_is_a_directory", "not a regular file"),
                                            ("root_missing", "does not exist"),
                                            ("locked", "database is locked")])
def test_unusable_store_fails_train_stage_before_training(trouble, says, tmp_path, tiny_data, mlflow_template,
                                                          monkeypatch, capsys):
    from pipeline import tracking
    root = tmp_path / "repo"
    lock = None
    if trouble == "db_is_a_directory":
        (root / "mlflow.db").mkdir(parents=True)
    elif trouble == "locked":                           # another process holds the write lock throughout
        root.mkdir()
        shutil.copy(mlflow_template, root / "mlflow.db")
        lock = sqlite3.connect(root / "mlflow.db", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        monkeypatch.setitem(tracking.RunTracker.__init__.__kwdefaults__, "timeout", 0.5)   # not 30 s
    monkeypatch.setenv("DVC_ROOT", str(root))
    out = tmp_path / "out"
    try:
        code = run_stage("train", *train_argv(out, tiny_data, write_params(tmp_path / "params.yaml",
                                                                           small_params())))
    finally:
        if lock is not None:
            lock.close()
    err = capsys.readouterr().err
    assert code == 1
    assert f"MLflow store {root / 'mlflow.db'}" in err and says in err, err
    assert not out.exists()                              # no checkpoint: it failed before training


LOGGING_BREAKS = r'''
import runpy, sys
from mlflow import MlflowClient
real_log_batch = MlflowClient.log_batch

def log_batch(self, run_id, metrics=(), params=(), tags=(), *a, **k):
    if metrics and max(m.step for m in metrics) >= 3:
        raise RuntimeError("injected: database is locked")
    return real_log_batch(self, run_id, metrics=metrics, params=params, tags=tags, *a, **k)

def log_model_artifacts(self, model_id, local_dir, *a, **k):
    raise OSError("injected: artifact store unreachable")

MlflowClient.log_batch = log_batch
MlflowClient.log_model_artifacts = log_model_artifacts
sys.argv = ["stages/train.py", *sys.argv[1:]]
runpy.run_module("stages.train", run_name="__main__", alter_sys=True)
'''


def test_logging_failures_after_start_warn_and_training_completes(tmp_path, tiny_data, store):
    """The store breaks after the run started (metrics from step 3 on, the MLflow model's files):
    the stage warns on stderr naming the store, still exits 0 and writes every output."""
    driver = tmp_path / "driver.py"
    driver.write_text(LOGGING_BREAKS)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DVC_ROOT": str(store), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(driver), *map(str, train_argv(out, tiny_data,
                        write_params(tmp_path / "params.yaml", small_params())))],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "continuing; the DVC outputs remain the record" in ln]
    assert any(f"MLflow store {store / 'mlflow.db'}: log_metrics failed" in ln and "database is locked" in ln
               for ln in warnings), r.stderr
    assert any("log_model" in ln and "artifact store unreachable" in ln for ln in warnings), r.stderr
    assert torch.load(out / "data/train/model.pt", weights_only=True)["params"]["train"]["iterations"] == 4
    assert (out / "reports/train_curve.csv").read_text().count("\n") == 1 + 4
    (run,) = runs_in_store(store)
    assert run["loss_steps"] == [1, 2] and run["status"] == "FINISHED"
