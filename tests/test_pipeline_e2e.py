"""Drives every stage end to end through `dvc repro` on a tiny config, then a `dvc exp run`
variant that must re-run train, evaluate and report only."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

TINY = {
    "base": {"seed": 3},
    "data": {"crop_size": 64, "synthetic": {"num_train": 16, "num_test": 4, "image_size": 64},
             "prepare_workers": 1},
    "model": {"hidden_dim": 32, "num_queries": 8, "nheads": 2, "dec_layers": 2, "dim_feedforward": 64,
              "conv_dim": 32, "mask_dim": 32, "gn_groups": 8},
    "loss": {"sim_points": 10, "sim_base_points": 8, "pp_points": 10},
    "train": {"iterations": 4, "batch_size": 4, "checkpoint_interval": 2, "log_interval": 1, "threads": 1},
    "pseudo": {"enabled": True, "iterations": 2},
}


def tiny_params() -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    for group, values in TINY.items():
        for k, v in values.items():
            if isinstance(v, dict):
                p[group][k].update(v)
            else:
                p[group][k] = v
    return p


def make_project(dst: Path, params: dict) -> Path:
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, dst / name)
    (dst / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", dst / ".dvc" / "config")
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dst, check=True, env=env)
    return dst


def project_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update({"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@localhost", "OMP_NUM_THREADS": "1"})
    env.pop("DVC_ROOT", None)
    return env


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    dvc_bin = Path(sys.executable).parent / "dvc"
    r = subprocess.run([str(dvc_bin), *args], cwd=project, env=project_env(), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r


def mlflow_runs(project: Path) -> list[tuple]:
    con = sqlite3.connect(project / "mlflow.db")
    try:
        return con.execute(
            "select r.run_uuid, r.status, e.name from runs r join experiments e on r.experiment_id = e.experiment_id"
        ).fetchall()
    finally:
        con.close()


def metric_keys(project: Path, run_id: str) -> set[str]:
    con = sqlite3.connect(project / "mlflow.db")
    try:
        return {r[0] for r in con.execute("select distinct key from metrics where run_uuid = ?", (run_id,))}
    finally:
        con.close()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is required for dvc")
    proj = make_project(tmp_path_factory.mktemp("e2e"), tiny_params())
    dvc(proj, "repro")
    return proj


def test_repro_writes_every_output(project: Path):
    ds = project / "data" / "dataset"
    assert len(list((ds / "images_detectron2" / "train").glob("*.jpg"))) == 16
    assert len(list((ds / "annotations_detectron2" / "test").glob("*.png"))) == 4
    split = json.loads((project / "data" / "split" / "split.json").read_text())
    assert split["num_classes"] == 24 and len(split["novel"]) == 6
    index = json.loads((project / "data" / "split" / "index.json").read_text())
    assert len(index["train"]) == 16 and len(index["test"]) == 4
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    for k in ("mIoU", "mIoU_base", "mIoU_novel", "hIoU", "pAcc"):
        assert k in metrics and (metrics[k] is None or 0.0 <= metrics[k] <= 100.0)
    curve = (project / "reports" / "train_curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,") and len(curve) == 1 + 4        # header + one row per step
    assert "loss_sim" in curve[0] and "loss_pp" in curve[0] and "loss_comp" in curve[0]
    report = (project / "reports" / "report.md").read_text()
    assert f"{metrics['mIoU']:.1f}" in report
    for png in ("train_curve.png", "per_class_iou.png"):
        assert (project / "reports" / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (project / "data" / "train" / "model.pt").stat().st_size > 0
    retrain = json.loads((project / "reports" / "retrain_metrics.json").read_text())
    assert retrain["enabled"] is True and 0.0 <= retrain["pseudo_novel_precision"] <= 100.0
    labels = sorted((project / "data" / "retrain" / "labels" / "annotations_detectron2" / "train").glob("*.png"))
    assert len(labels) == 16
    assert "## Pseudo-label retraining" in report


def test_mlflow_run_has_params_losses_metrics_and_model(project: Path):
    runs = mlflow_runs(project)
    assert len(runs) == 2                                     # the training and the pseudo-label retraining
    con = sqlite3.connect(project / "mlflow.db")
    stage = dict(con.execute("select run_uuid, value from tags where key = 'stage'").fetchall())
    con.close()
    assert sorted(stage.values()) == ["evaluate", "retrain"] or sorted(stage.values()) == ["retrain", "train"]
    run_id, status, experiment = next(r for r in runs if stage[r[0]] != "retrain")
    assert status == "FINISHED" and experiment == "simformer-synthetic-split1"
    keys = metric_keys(project, run_id)
    assert {"loss", "loss_ce", "loss_sim", "mIoU", "mIoU_novel", "hIoU"} <= keys
    con = sqlite3.connect(project / "mlflow.db")
    params = dict(con.execute("select key, value from params where run_uuid = ?", (run_id,)).fetchall())
    tags = dict(con.execute("select key, value from tags where run_uuid = ?", (run_id,)).fetchall())
    con.close()
    assert params["loss.pp_weight"] == "0.3" and params["train.iterations"] == "4"
    assert len(tags["git_commit"]) == 40 and len(tags["params_hash"]) == 16
    artifacts = list((project / "mlartifacts").rglob("*"))
    names = {a.name for a in artifacts}
    assert {"model.pt", "params.yaml", "metrics.json"} <= names


def test_exp_run_reruns_only_loss_readers(project: Path):
    r = dvc(project, "exp", "run", "-S", "loss.pp_weight=0.5")
    out = r.stdout + r.stderr
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out and "Running stage 'report'" in out
    assert "Running stage 'download'" not in out and "Running stage 'prepare'" not in out
    runs = mlflow_runs(project)
    assert len(runs) == 4 and all(s == "FINISHED" for _, s, _ in runs)


def test_bad_params_fail_before_work(tmp_path: Path):
    params = tiny_params()
    params["loss"]["pp_wieght"] = 0.5
    proj = make_project(tmp_path, params)
    env = project_env()
    r = subprocess.run([sys.executable, "-m", "stages.download", "--out", "data/dataset", "--raw", "data/raw"],
                       cwd=proj, env=env, capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown params key 'loss.pp_wieght'. Did you mean 'loss.pp_weight'?" in r.stderr
    assert not (proj / "data").exists()
