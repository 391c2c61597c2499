"""MLflow 3 as its users expect it, against a throw-away store: the train and evaluate stages run
for real (in-process, tiny config) twice, then the registry, the run page and predict are
checked the way a user looks at them.

* the main model's run is named ``full-seed<seed> (main)``; the dataset is a run input whose
  digest is ``data/dataset``'s DVC hash from dvc.lock; system metrics are recorded;
* the evaluation metrics are linked to the logged model (the Models tab) and the dataset;
* the confusion-matrix and qualitative figures are artifacts of the training run;
* ``@latest`` is the newest registered version (MLflow 3.17's reserved alias: it cannot be set,
  it resolves by itself); ``champion`` moves only to a better novel mIoU; ``tools.predict
  --model models:/<name>@champion`` and ``@latest`` work;
* ``python -m tools.mlflow_ui`` (run by ``make ui``) prints the runs table's URL;
* the relative artifact location of a freshly created store; one grid, one DVC experiment.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import build_params, flatten, params_hash, to_dict
from pipeline.tracking import (
    CHAMPION,
    LATEST,
    RunTracker,
    experiment_name,
    promote_version,
    sync_grid,
    tracking_uri,
)
from tests.conftest import ROOT
from tests.support_tiny import make_tiny_data, run_stage, tiny_params, write_params

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")

EXP = experiment_name("synthetic", 1)
DIGEST = "0123456789abcdef0123456789abcdef.dir"          # as DVC writes a folder's md5 into dvc.lock
ENV = ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI",
       "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")


def _client(root):
    return mlflow.MlflowClient(tracking_uri=tracking_uri(root))


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for k in ENV:
        monkeypatch.delenv(k, raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


def _train_and_evaluate(project: Path, data: Path, params: Path) -> None:
    common = ["--params", params, "--dataset-dir", "data/dataset", "--split-dir", "data/split", "--no-progress"]
    assert run_stage("train", *common, "--model", "data/train/model.pt", "--checkpoint", "data/checkpoints/train.pt",
                     "--curve", "reports/train_curve.csv") == 0
    assert run_stage("evaluate", *common, "--model", "data/train/model.pt", "--metrics", "reports/metrics.json",
                     "--per-class", "reports/per_class_iou.csv", "--confusion", "data/eval/confusion.npy",
                     "--confusion-csv", "reports/confusion.csv") == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A project (dvc.lock naming data/dataset's hash) where the main model trained and was evaluated
    twice: seed 3 (version 1), then with another learning rate (version 2)."""
    saved = {k: os.environ.pop(k, None) for k in ENV}
    cwd = Path.cwd()
    root = tmp_path_factory.mktemp("mlflow_ux")
    data = make_tiny_data(root / "tiny")
    project = root / "project"
    (project / "data").mkdir(parents=True)
    for name in ("dataset", "split"):
        (project / "data" / name).symlink_to(data / name, target_is_directory=True)
    (project / "dvc.lock").write_text(yaml_lock())
    os.environ.update({"DVC_ROOT": str(project), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"})
    os.chdir(project)
    try:
        outs = []
        for i, lr in enumerate((0.001, 0.003)):
            params = write_params(project / "params.yaml", tiny_params(train={"lr": lr}))
            _train_and_evaluate(project, data, params)
            outs.append({"metrics": json.loads((project / "reports/metrics.json").read_text()),
                         "model": (project / "data/train/model.pt").read_bytes(), "params": params.read_text()})
            shutil.copy(project / "reports/confusion.csv", project / f"confusion-{i}.csv")
        yield project, outs
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)


def yaml_lock() -> str:
    return ("schema: '2.0'\nstages:\n  download:\n    cmd: python -m stages.download --out data/dataset\n"
            f"    outs:\n    - path: data/dataset\n      hash: md5\n      md5: {DIGEST}\n      size: 123\n"
            "      nfiles: 41\n")


def _main_runs(project):
    c = _client(project)
    exp = c.get_experiment_by_name(EXP)
    runs = c.search_runs([exp.experiment_id], "tags.stage = 'train'", order_by=["attributes.start_time ASC"])
    return c, exp, runs


def test_main_run_is_named_with_its_dataset_and_system_metrics(trained):
    project, outs = trained
    c, exp, runs = _main_runs(project)
    assert [r.info.run_name for r in runs] == ["full-seed3 (main)"] * 2
    run = runs[0]
    assert run.info.status == "FINISHED"
    (ds,) = run.inputs.dataset_inputs
    assert (ds.dataset.name, ds.dataset.digest) == ("synthetic", DIGEST)
    assert json.loads(ds.dataset.source) == {"uri": "data/dataset"}
    assert json.loads(ds.dataset.profile)["digest_from"] == "dvc.lock"
    assert {t.key: t.value for t in ds.tags} == {"mlflow.data.context": "training"}
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system


def test_evaluation_metrics_are_linked_to_the_logged_model(trained):
    project, outs = trained
    c, exp, runs = _main_runs(project)
    for run, out in zip(runs, outs):
        (model,) = c.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
        linked = {m.key: m for m in model.metrics}
        assert linked["mIoU_novel"].value == pytest.approx(out["metrics"]["mIoU_novel"], abs=1e-6)
        assert {"mIoU", "mIoU_base", "hIoU", "pAcc"} <= set(linked)
        assert (linked["mIoU"].dataset_name, linked["mIoU"].dataset_digest) == ("synthetic", DIGEST)
        assert "loss" not in linked                                     # training curves stay on the run
        arts = {a.path for a in c.list_artifacts(run.info.run_id, "eval")}
        assert {"eval/confusion_matrix.png", "eval/qualitative.png", "eval/confusion.csv", "eval/metrics.json"} <= arts
    img = mlflow.artifacts.download_artifacts(run_id=runs[0].info.run_id, artifact_path="eval/confusion_matrix.png",
                                              tracking_uri=tracking_uri(project), dst_path=str(project / "dl"))
    assert Path(img).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_aliases_latest_and_champion(trained):
    project, outs = trained
    c, exp, runs = _main_runs(project)
    versions = {str(v.version): v for v in c.search_model_versions(f"name = '{EXP}'")}
    assert sorted(versions, key=int) == ["1", "2"]
    assert str(c.get_model_version_by_alias(EXP, LATEST).version) == "2"     # MLflow's reserved alias: the newest
    assert set(c.get_registered_model(EXP).aliases) == {CHAMPION}             # nothing failed to set "latest"
    novel = [o["metrics"]["mIoU_novel"] for o in outs]
    expected = "2" if novel[1] > novel[0] else "1"
    assert str(c.get_model_version_by_alias(EXP, CHAMPION).version) == expected
    for v, n in zip(("1", "2"), novel):
        assert float(c.get_model_version(EXP, v).tags["mIoU_novel"]) == pytest.approx(n, rel=1e-5)
        assert c.get_model_version(EXP, v).run_id == runs[int(v) - 1].info.run_id


def test_predict_accepts_the_champion_alias(trained, tmp_path):
    import cv2
    import numpy as np
    project, outs = trained
    c = _client(project)
    champion = int(c.get_model_version_by_alias(EXP, CHAMPION).version)
    from pipeline.predict import resolve_model
    got = resolve_model(f"models:/{EXP}@{CHAMPION}", tmp_path / "dl", tracking_uri(project))
    assert got.read_bytes() == outs[champion - 1]["model"]
    newest = resolve_model(f"models:/{EXP}@{LATEST}", tmp_path / "dl2", tracking_uri(project))
    assert newest.read_bytes() == outs[1]["model"]
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    r = subprocess.run([sys.executable, "-m", "tools.predict", "--model", f"models:/{EXP}@{CHAMPION}", "--out",
                        str(tmp_path / "out"), "--no-progress", "--tracking-uri", tracking_uri(project), str(image)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert cv2.imread(str(tmp_path / "out" / "photo_label.png"), cv2.IMREAD_UNCHANGED).shape == (40, 56)


def test_mlflow_ui_tool_prints_the_runs_table(trained):
    project, _ = trained
    exp_id = _client(project).get_experiment_by_name(EXP).experiment_id
    r = subprocess.run([sys.executable, "-m", "tools.mlflow_ui"], cwd=project, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "DVC_ROOT": str(project)})
    assert r.returncode == 0, r.stderr
    assert f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning" in r.stdout
    assert f"http://127.0.0.1:5000/#/experiments/{exp_id}/models?workflowType=machine_learning" in r.stdout
    assert f"http://127.0.0.1:5000/#/models/{EXP}" in r.stdout and "champion: version" in r.stdout
    assert f"models:/{EXP}@champion" in r.stdout
    champ = _client(project).get_model_version_by_alias(EXP, "champion").version
    assert f"champion version:    http://127.0.0.1:5000/#/models/{EXP}/versions/{champ}\n" in r.stdout
    recipe = re.search(r"^ui:.*?(?=^\S)", (ROOT / "Makefile").read_text() + "\nx", re.S | re.M).group(0)
    assert recipe.index("python -m tools.mlflow_ui") < recipe.index("mlflow ui ")


def test_champion_moves_only_to_a_better_novel_miou(tmp_path, clean_env):
    """Versions registered in order with novel mIoU 10, 5, 12, NaN, None: the champion is 1, 1, 3, 3, 3."""
    p = build_params(tiny_params())
    c = None
    expected = []
    for i, value in enumerate((10.0, 5.0, 12.0, float("nan"), None)):
        with RunTracker(tmp_path, EXP) as tr:
            tr.start(f"h{i}", f"run{i}", flatten(to_dict(p)), "", {})
            c = tr.client
            if i == 0:
                c.create_registered_model(EXP)
            c.create_model_version(EXP, str(tmp_path / f"m{i}"), run_id=tr.run_id)
            got = promote_version(c, EXP, tr.run_id, value)
        expected.append({0: "1", 1: "1", 2: "3"}.get(i, "3"))
        assert str(c.get_model_version_by_alias(EXP, CHAMPION).version) == expected[-1]
        assert got["champion"] == (i in (0, 2))
    assert c.get_model_version(EXP, "2").tags["mIoU_novel"] == "5"
    assert "mIoU_novel" not in c.get_model_version(EXP, "4").tags          # NaN is not recorded as a value


def test_fresh_store_records_a_relative_artifact_location(tmp_path, clean_env):
    """The one hand-written SQL statement (tracking.RunTracker._experiment: MLflow 3.17 makes every
    artifact location absolute) leaves a store that works where it is and after a move."""
    p = build_params(tiny_params())
    root = tmp_path / "store"
    root.mkdir()
    with RunTracker(root, EXP) as tr:
        rid = tr.start(params_hash(p), "r", flatten(to_dict(p)), "fresh: store\n", {})
    c = _client(root)
    exp = c.get_experiment_by_name(EXP)
    assert exp.artifact_location == f"mlartifacts/{EXP}"
    assert (root / "mlartifacts" / EXP / rid / "artifacts" / "params.yaml").read_text() == "fresh: store\n"
    moved = tmp_path / "moved"
    root.rename(moved)
    os.chdir(moved)                                # `make ui` and the stages read from the repository root
    got = mlflow.artifacts.download_artifacts(run_id=rid, artifact_path="params.yaml",
                                              tracking_uri=tracking_uri(moved), dst_path=str(tmp_path / "dl"))
    assert Path(got).read_text() == "fresh: store\n"


def _cell(variant, seed, **loss):
    p = build_params(tiny_params(base={"seed": seed}, loss=loss))
    return {"variant": variant, "seed": seed, "params_hash": params_hash(p), "params_flat": flatten(to_dict(p)),
            "params_text": f"# {variant}-{seed}\n", "metrics": {"mIoU_novel": 10.0 * seed}}


def test_one_grid_one_experiment(tmp_path, clean_env, monkeypatch):
    """A second grid made by `dvc exp run` in the same workspace: each grid's cells are found by its
    grid_id, one run per cell (a cached cell through a link run tagged with the experiment), so
    the UI's "group by variant" over one grid never mixes in the other's cells."""
    root = tmp_path
    grid1 = [_cell("+complementary", 6, sim_weight=0.0, pp_weight=0.0), _cell("full", 6)]
    g1 = sync_grid(root, EXP, "g1", {"cells": 2}, grid1, {"plus_complementary.mIoU_novel.mean": 60.0}, "x: 1\n")
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-sand")
    grid2 = [grid1[0], _cell("full", 6, pp_weight=0.5)]
    g2 = sync_grid(root, EXP, "g2", {"cells": 2}, grid2, {}, "x: 2\n")
    c = _client(root)
    exp_id = c.get_experiment_by_name(EXP).experiment_id
    for g, grid in (("g1", g1), ("g2", g2)):
        cells = c.search_runs([exp_id], f"tags.grid_id = '{g}' and tags.variant != ''")
        keys = sorted(f"{r.data.tags['variant']}-seed{r.data.tags['seed']}" for r in cells)
        assert keys == ["+complementary-seed6", "full-seed6"]
        assert {r.info.run_id for r in cells} == set(grid["children"].values())
    link = c.get_run(g2["children"]["+complementary-seed6"])
    assert link.data.tags["role"] == "cell_link" and link.data.tags["dvc_exp_name"] == "bushy-sand"
    assert link.info.run_name == "+complementary-seed6@bushy-sand (cached)"
    assert link.data.tags["variant"] == "+complementary"
    parent = c.get_run(g1["parent"])
    assert parent.data.tags["variant_keys"] == "plus_complementary=+complementary"
    assert parent.data.metrics == {"plus_complementary.mIoU_novel.mean": 60.0}
    assert c.get_run(g2["parent"]).data.tags["dvc_exp_name"] == "bushy-sand"
