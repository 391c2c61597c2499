"""Resume after SIGKILL: a real `python -m stages.train` (the dvc.yaml command) is killed once its
checkpoint is past step 4, then re-run. The result must be bit-identical to an uninterrupted run
with the same seed, and MLflow must hold one resumed run, not two."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.helpers import ROOT, run_stage, small_params, write_params

ITERATIONS, KILL_AFTER = 8, 4


def _train_cmd(project: Path) -> list[str]:
    cmd = shlex.split(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["cmd"])
    assert cmd[:3] == ["python", "-m", "stages.train"]
    return [sys.executable, *cmd[1:], "--no-progress"]


def _project(root: Path, data: Path, params: dict) -> Path:
    root.mkdir(parents=True)
    (root / "data").mkdir()
    for name in ("dataset", "split"):
        (root / "data" / name).symlink_to(data / name, target_is_directory=True)
    write_params(root / "params.yaml", params)
    return root


def _env(project: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
            "DVC_ROOT": str(project)}


def _ckpt_step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except (FileNotFoundError, ValueError, RuntimeError, EOFError, KeyError):
        return -1


def _last_logged_step(project: Path) -> int:
    try:
        con = sqlite3.connect(project / "mlflow.db", timeout=0.2)
        try:
            (step,) = con.execute("select max(step) from metrics where key = 'loss'").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return -1
    return -1 if step is None else int(step)


def _loss_columns(curve: Path) -> pd.DataFrame:
    df = pd.read_csv(curve)
    return df[[c for c in df.columns if c == "step" or c.startswith("loss")]]


def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_data, mlflow_template):
    from pipeline.config import build_params, flatten, params_hash, to_dict
    raw = small_params(train={"iterations": ITERATIONS, "checkpoint_interval": 2, "log_interval": 1, "threads": 1})
    phash = params_hash(build_params(raw))
    ref, run = _project(tmp_path / "ref", tiny_data, raw), _project(tmp_path / "run", tiny_data, raw)
    shutil.copy(mlflow_template, run / "mlflow.db")
    ckpt = run / "data/checkpoints/train.pt"

    victim = subprocess.Popen(_train_cmd(run), cwd=run, env=_env(run), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:                       # a checkpoint past step 4, and a later step already logged
            step = _ckpt_step(ckpt)
            if step >= KILL_AFTER and _last_logged_step(run) > step:
                break
            assert victim.poll() is None, f"training ended before it could be killed:\n{victim.communicate()[1]}"
            assert time.monotonic() < deadline, "no checkpoint past step 4 within 240 s"
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)            # mid-step: the work after the checkpoint is lost
        victim.communicate(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    killed_at, lost_up_to = _ckpt_step(ckpt), _last_logged_step(run)
    assert KILL_AFTER <= killed_at < lost_up_to <= ITERATIONS and killed_at < ITERATIONS, (killed_at, lost_up_to)
    assert not (run / "data/train/model.pt").exists()
    con = sqlite3.connect(run / "mlflow.db")
    (status_after_kill,) = con.execute("select status from runs").fetchone()
    con.close()
    assert status_after_kill == "RUNNING"                     # nobody could mark it

    resumed = subprocess.Popen(_train_cmd(run), cwd=run, env=_env(run), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        # Meanwhile the uninterrupted reference, the same stage in this process (saves a start-up), no MLflow.
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(ref)
            assert run_stage("train", *_train_cmd(ref)[3:], "--no-mlflow") == 0
        res_out, res_err = resumed.communicate(timeout=300)
    finally:
        if resumed.poll() is None:
            resumed.kill()
    assert resumed.returncode == 0, res_err
    assert f"(resumed from {killed_at})" in res_out, res_out

    # --- the weights: bit-identical, every tensor
    a = torch.load(ref / "data/train/model.pt", weights_only=True)["model"]
    b = torch.load(run / "data/train/model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ after resume, e.g. {differ[:3]}"
    # --- the training curve: every step once, loss columns equal (images/s is timing)
    ca, cb = _loss_columns(ref / "reports/train_curve.csv"), _loss_columns(run / "reports/train_curve.csv")
    assert list(cb["step"]) == list(range(1, ITERATIONS + 1))
    pd.testing.assert_frame_equal(ca, cb, check_exact=True)

    # --- MLflow: the killed run was resumed, not duplicated; params logged once, unchanged
    con = sqlite3.connect(run / "mlflow.db")
    try:
        runs = con.execute("select r.run_uuid, r.status from runs r join tags t on r.run_uuid = t.run_uuid "
                           "where t.key = 'params_hash' and t.value = ?", (phash,)).fetchall()
        assert len(runs) == 1 and con.execute("select count(*) from runs").fetchone()[0] == 1, runs
        (run_id, status), = runs
        assert status == "FINISHED"
        tags = dict(con.execute("select key, value from tags where run_uuid = ?", (run_id,)).fetchall())
        params = dict(con.execute("select key, value from params where run_uuid = ?", (run_id,)).fetchall())
        losses = con.execute("select step, value from metrics where run_uuid = ? and key = 'loss'",
                             (run_id,)).fetchall()
    finally:
        con.close()
    assert tags["resume_count"] == "1"
    expected = {k: ("" if v is None else str(v)) for k, v in flatten(to_dict(build_params(raw))).items()}
    assert params == expected
    assert "keeps its logged values" not in res_err
    # steps between the last checkpoint and the kill were logged twice - with the same values
    assert sum(1 for st, _ in losses if killed_at < st <= lost_up_to) == 2 * (lost_up_to - killed_at)
    by_step: dict[int, set] = {}
    for step, value in losses:
        by_step.setdefault(step, set()).add(value)
    assert sorted(by_step) == list(range(1, ITERATIONS + 1))
    assert all(len(v) == 1 for v in by_step.values()), {s: v for s, v in by_step.items() if len(v) > 1}
    assert [by_step[s].pop() for s in range(1, ITERATIONS + 1)] == pytest.approx(list(cb["loss"]), rel=1e-6)
