"""Drives every stage end to end through `dvc repro` on a tiny config, then a `dvc exp run`
variant that must re-run train, evaluate and report only. The tests share one project (module
scope) and run in file order: the later ones change it (run cache, experiments, the queue)."""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import cv2

import pytest
import yaml

from tests.conftest import module_dir
from tests.helpers import dvc, make_project, metric_keys, mlflow_runs, project_env, run_info, run_tags, tiny_params


@pytest.fixture(scope="module")
def project(request, tmp_path_factory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is required for dvc")
    proj = make_project(module_dir(request, tmp_path_factory, "e2e"), tiny_params())
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
    assert "loss_sim" in curve[0] and "loss_dist" in curve[0] and "loss_comp" in curve[0]
    report = (project / "reports" / "report.md").read_text()
    assert f"{metrics['mIoU']:.1f}" in report
    for png in ("train_curve.png", "per_class_iou.png"):
        assert (project / "reports" / "figures" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (project / "data" / "train" / "model.pt").stat().st_size > 0
    retrain = json.loads((project / "reports" / "retrain_metrics.json").read_text())["retrain"]
    assert 0.0 <= retrain["pseudo_novel_precision"] <= 100.0 and "mIoU_novel" in retrain
    labels = sorted((project / "data" / "retrain" / "labels" / "annotations_detectron2" / "train").glob("*.png"))
    assert len(labels) == 16
    assert "## Pseudo-label retraining" in report
    ablation = (project / "reports" / "ablation.md").read_text()
    cells = {c.name: json.loads((c / "cell.json").read_text()) for c in (project / "data" / "ablation").iterdir()}
    assert sorted(cells) == ["baseline-3", "baseline-4", "full-3", "full-4"]
    assert cells["full-3"]["shared_with_main"] is True and not (project / "data/ablation/full-3/model.pt").exists()
    assert cells["full-4"]["shared_with_main"] is False
    full3 = json.loads((project / "data" / "ablation" / "full-3" / "metrics.json").read_text())
    assert full3["mIoU"] == pytest.approx(metrics["mIoU"])           # the same model, evaluated again
    assert "baseline" in ablation and "full" in ablation and " ± " in ablation
    html = (project / "reports" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    assert html.count("<h1>") == 1 and report.count("\n# ") + report.startswith("# ") == 1      # one title
    grid = json.loads((project / "reports" / "ablation.json").read_text())
    assert sorted(grid) == ["baseline", "full"]
    full = [json.loads((project / "data" / "ablation" / f"full-{s}" / "metrics.json").read_text())["mIoU_novel"]
            for s in (3, 4)]
    assert grid["full"]["mIoU_novel"]["n"] == 2
    assert grid["full"]["mIoU_novel"]["mean"] == pytest.approx(sum(full) / 2, abs=1e-4)
    # the trivial-baselines table gives each grid variant's mean pixel accuracy over its cells
    pacc = [json.loads((project / "data" / "ablation" / f"full-{s}" / "metrics.json").read_text())["pAcc"]
            for s in (3, 4)]
    row = next(line for line in ablation.splitlines() if line.startswith("| grid: full (mean of 2 seeds) |"))
    assert row.split("|")[-2].strip() == f"{sum(pacc) / 2:.1f}"


def test_a_cell_trained_alone_equals_the_cell_trained_beside_another(project: Path, tmp_path: Path):
    """The grid trained two cells at a time (ablation.workers 2); full-4 trained again alone, in this
    process's pool of one, with the same fixed threads, gives the same losses and metrics to the bit."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ablation"]["workers"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cmd = [sys.executable, "-m", "stages.ablate", "--params", str(tmp_path / "params.yaml"), "--cell", "full-4",
           "--main-model", "data/train/model.pt", "--dataset-dir", "data/dataset", "--split-dir", "data/split",
           "--init", "data/pretrain/init.pt", "--checkpoints", str(tmp_path / "ck"), "--out", str(tmp_path / "out"),
           "--no-mlflow", "--no-progress"]
    r = subprocess.run(cmd, cwd=project, env=project_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "ablation grid: 1 cell, 1 at a time, 1 torch thread each: full-4" in r.stdout
    grid_cell, alone = project / "data" / "ablation" / "full-4", tmp_path / "out" / "full-4"
    assert sorted(p.name for p in alone.iterdir()) == ["cell.json", "curve.csv", "metrics.json", "model.pt",
                                                       "per_class_iou.csv"]
    import pandas as pd
    curves = [pd.read_csv(d / "curve.csv").drop(columns=["images_per_s", "seconds"]) for d in (grid_cell, alone)]
    assert len(curves[0]) == 4 and {"loss", "loss_dist", "grad_DistLoss"} <= set(curves[0].columns)
    pd.testing.assert_frame_equal(curves[0], curves[1], check_exact=True)     # every loss, to the bit
    assert json.loads((alone / "metrics.json").read_text()) == json.loads((grid_cell / "metrics.json").read_text())
    cells = [json.loads((d / "cell.json").read_text()) for d in (grid_cell, alone)]
    assert cells[0]["torch_threads"] == cells[1]["torch_threads"] == 1
    r = subprocess.run(cmd + ["--cell", "full-9"], cwd=project, env=project_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "--cell 'full-9' is not a cell of the grid; cells: baseline-3, baseline-4, " \
        "full-3, full-4" in r.stderr


def test_a_finished_run_that_recorded_other_metrics_is_left_alone(project: Path, tmp_path: Path):
    """A finished cell run is history: a finished checkpoint that evaluates to other numbers than
    its run recorded (here: the run's mIoU changed by hand) gets a new run; the old one is untouched."""
    from mlflow import MlflowClient
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, symlinks=True)
    client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    old = json.loads((copy / "data/ablation/baseline-4/cell.json").read_text())["run_id"]
    client.log_metric(old, "mIoU", 12.5)              # as if that run had recorded another training
    before = [(m.value, m.timestamp) for m in client.get_metric_history(old, "mIoU")]
    cmd = [sys.executable, "-m", "stages.ablate", "--cell", "baseline-4", "--main-model", "data/train/model.pt",
           "--dataset-dir", "data/dataset", "--split-dir", "data/split", "--init", "data/pretrain/init.pt",
           "--checkpoints", "data/checkpoints_ablation", "--out", str(tmp_path / "out"), "--no-progress"]
    r = subprocess.run(cmd, cwd=copy, env=project_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"the finished MLflow run {old} of these params recorded other metrics" in r.stdout
    new = json.loads((tmp_path / "out/baseline-4/cell.json").read_text())["run_id"]
    assert new != old
    assert [(m.value, m.timestamp) for m in client.get_metric_history(old, "mIoU")] == before
    run = client.get_run(new)
    metrics = json.loads((tmp_path / "out/baseline-4/metrics.json").read_text())
    assert run.info.status == "FINISHED" and run.data.tags["differs_from_run_id"] == old
    assert run.data.metrics["mIoU"] == metrics["mIoU"] != 12.5
    assert len(client.get_metric_history(new, "loss")) == 4           # the checkpoint's curve, one per step
    r = subprocess.run(cmd, cwd=copy, env=project_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "recorded other metrics" not in r.stdout, r.stderr
    assert json.loads((tmp_path / "out/baseline-4/cell.json").read_text())["run_id"] == new
    assert len(client.get_metric_history(new, "mIoU")) == 1           # found again: nothing logged twice


def test_dvc_metrics_are_only_metrics(project: Path):
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    metrics = files["reports/metrics.json"]["data"]
    assert sorted(metrics) == sorted(("mIoU", "mIoU_base", "mIoU_novel", "hIoU", "pAcc", "mAcc", "fwIoU"))
    retrain = files["reports/retrain_metrics.json"]["data"]["retrain"]
    assert sorted(retrain) == sorted(list(metrics) + ["pseudo_novel_precision"])
    grid = files["reports/ablation.json"]["data"]
    assert sorted(grid["baseline"]) == ["hIoU", "mIoU", "mIoU_base", "mIoU_novel"]
    assert sorted(grid["baseline"]["mIoU"]) == ["mean", "n", "std"]


def test_mlflow_runs_parent_and_children(project: Path):
    tags = run_tags(project)
    by_stage = {}
    for run_id, t in tags.items():
        by_stage.setdefault(t.get("role") or t.get("stage"), []).append(run_id)
    # main training (evaluate logs onto it; it is also the shared cell full-3), retraining,
    # the grid's parent and the three cells that trained.
    assert sorted((k, len(v)) for k, v in by_stage.items()) == [
        ("ablate", 3), ("ablation_grid", 1), ("retrain", 1), ("train", 1)]
    parent = by_stage["ablation_grid"][0]
    children = {f"{t['variant']}-{t['seed']}": r for r, t in tags.items() if t.get("mlflow.parentRunId") == parent}
    assert sorted(children) == ["baseline-3", "baseline-4", "full-3", "full-4"]
    main_run = by_stage["train"][0]
    assert children["full-3"] == main_run
    keys = metric_keys(project, main_run)
    assert {"loss", "loss_ce", "loss_sim", "loss_dist", "loss_comp", "mIoU", "mIoU_novel", "hIoU"} <= keys
    assert not keys & {"split", "num_classes", "num_valid_classes", "pixels"}     # counts are tags
    labelled = sum(int((cv2.imread(str(p), cv2.IMREAD_UNCHANGED) != 255).sum())       # 255: unlabelled clutter
                   for p in (project / "data/dataset/annotations_detectron2/test").glob("*.png"))
    assert 0.6 * 4 * 64 * 64 < labelled < 4 * 64 * 64
    assert tags[main_run]["eval.pixels"] == str(labelled)
    con = sqlite3.connect(project / "mlflow.db")
    params = dict(con.execute("select key, value from params where run_uuid = ?", (main_run,)).fetchall())
    locations = [r[0] for r in con.execute("select artifact_location from experiments where name like 'simformer%'")]
    con.close()
    info = run_info(project)
    assert all(info[r][0] == "FINISHED" for r in tags)
    assert not [r for r, t in tags.items() if "resume_count" in t]                  # nothing was interrupted
    # evaluate, the shared cell and the report reopened the training run: it still ends when training did
    assert info[main_run][2] < info[parent][1]
    assert {info[r][3] for r in tags} == {"full-seed3 (main)", "retrain", "ablation-grid", "baseline-seed3", "baseline-seed4",
                                          "full-seed4"}
    assert params["loss.pp_weight"] == "0.3" and params["train.iterations"] == "4"
    assert len(tags[main_run]["git_commit"]) == 40 and len(tags[main_run]["params_hash"]) == 16
    assert locations == ["mlartifacts/simformer-synthetic-split1"]                 # relative to the repository
    names = {a.name for a in (project / "mlartifacts").rglob("*")}
    assert {"model.pt", "MLmodel", "params.yaml", "metrics.json", "report.html", "ablation.md", "ablation.json"} <= names
    # the parent carries the grid's results; each cell its own effective params
    parent_metrics = metric_keys(project, parent)
    assert {"baseline.mIoU_novel.mean", "baseline.mIoU_novel.std", "full.hIoU.mean"} <= parent_metrics
    cell = yaml.safe_load((project / "mlartifacts" / "simformer-synthetic-split1" / children["baseline-4"]
                           / "artifacts" / "params.yaml").read_text())
    assert (cell["base"]["seed"], cell["loss"]["comp_weight"], cell["train"]["iterations"]) == (4, 0.0, 4)
    assert "ablation" not in cell


def test_registered_model_predicts_on_an_image(project: Path, tmp_path):
    import mlflow
    import numpy as np
    import torch

    from pipeline.data.dataset import read_image
    from pipeline.engine.evaluate import load_trained, predict
    from pipeline.tracking import using_store
    (tmp_path / "loaded").mkdir()                    # downloads land here, not in the system temp dir
    (tmp_path / "local").mkdir()
    with using_store(project):
        client = mlflow.MlflowClient()
        (version,) = client.search_model_versions("name = 'simformer-synthetic-split1'")
        model = mlflow.pyfunc.load_model("models:/simformer-synthetic-split1/1", dst_path=str(tmp_path / "loaded"))
        local = mlflow.artifacts.download_artifacts("models:/simformer-synthetic-split1/1", dst_path=str(tmp_path / "local"))
    assert version.run_id == next(r for r, t in run_tags(project).items() if t.get("stage") == "train")
    assert str(model.metadata.get_input_schema()) == "[Tensor('uint8', (-1, -1, 3))]"
    index = json.loads((project / "data" / "split" / "index.json").read_text())
    image = read_image(project / "data" / "dataset" / index["test"][0]["image"])
    labels = model.predict(image)
    assert labels.shape == image.shape[:2] and labels.dtype == np.int64
    net, _, _ = load_trained(project / "data" / "train" / "model.pt", torch.device("cpu"))
    expected = predict(net, torch.from_numpy(image).permute(2, 0, 1), image.shape[:2]).argmax(0).numpy()
    assert np.array_equal(labels, expected)
    assert (Path(local) / "artifacts" / "model.pt").read_bytes() == (project / "data/train/model.pt").read_bytes()


def test_copied_repository_keeps_its_artifacts(project: Path, tmp_path):
    import mlflow
    import numpy as np

    from pipeline.tracking import using_store
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, symlinks=True)
    away = project.with_name(project.name + "-away")
    project.rename(away)                                  # the original folder is gone while the copy is read
    try:
        parent = next(r for r, t in run_tags(copy).items() if t.get("role") == "ablation_grid")
        with using_store(copy):
            got = mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="report/ablation.md",
                                                      dst_path=str(tmp_path / "dl"))
            model = mlflow.pyfunc.load_model("models:/simformer-synthetic-split1/1")
        assert Path(got).read_text() == (copy / "reports" / "ablation.md").read_text()
        assert model.predict(np.zeros((32, 48, 3), np.uint8)).shape == (32, 48)
    finally:
        away.rename(project)


def test_run_cache_hit_leaves_no_cell_missing_and_no_duplicate(project: Path):
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    tags = run_tags(project)
    lost = [r for r, t in tags.items() if t.get("variant") == "baseline"]
    for r in lost:                 # as if their outputs came from DVC's run cache on another machine
        client.delete_run(r)
    before = len(mlflow_runs(project))
    dvc(project, "repro", "-f", "-s", "report")
    tags = run_tags(project)
    restored = [r for r, t in tags.items() if t.get("restored_from") == "dvc_run_cache"]
    assert len(restored) == 2 and len(mlflow_runs(project)) == before + 2
    assert {tags[r]["variant"] for r in restored} == {"baseline"}
    assert "mIoU_novel" in metric_keys(project, restored[0])
    dvc(project, "repro", "-f", "-s", "report")
    assert len(mlflow_runs(project)) == before + 2                  # found by params hash: nothing added


def test_compare_prints_runs_filtered_by_tags(project: Path):
    cmd = [sys.executable, "-m", "tools.compare", "--tag", "variant=baseline", "--tag", "variant=full",
           "--group-by", "variant", "--csv", "compare.csv"]
    r = subprocess.run(cmd, cwd=project, env=project_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import pandas as pd
    table = pd.read_csv(project / "compare.csv", header=[0, 1], index_col=0)
    assert sorted(table.index) == ["baseline", "full"]
    assert list(table[("mIoU_novel", "count")]) == [2, 2]
    cells = {n: json.loads((project / "data" / "ablation" / f"{n}-3" / "metrics.json").read_text())
             for n in ("baseline", "full")}
    assert "baseline" in r.stdout and "mIoU_novel" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tools.compare", "--tag", "variant=nope"], cwd=project,
                       env=project_env(), capture_output=True, text=True)
    assert r.returncode == 1 and "no runs in experiment 'simformer-synthetic-split1' match" in r.stderr
    assert cells["full"]["mIoU"] is not None


def test_exp_run_reruns_only_loss_readers_and_keeps_the_first_grid(project: Path):
    """Regression: a second grid (one loss weight changed) used to move the unchanged cells'
    runs to itself; now both parents keep all their children."""
    tags = run_tags(project)
    (first,) = [r for r, t in tags.items() if t.get("role") == "ablation_grid"]
    before = {r: t["mlflow.parentRunId"] for r, t in tags.items() if "mlflow.parentRunId" in t}
    assert len(before) == 4
    r = dvc(project, "exp", "run", "-S", "loss.pp_weight=0.5")
    out = r.stdout + r.stderr
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out and "Running stage 'report'" in out
    assert "Running stage 'download'" not in out and "Running stage 'prepare'" not in out
    assert "Running stage 'ablate'" in out and "cell full-4: mIoU" in out
    tags = run_tags(project)
    parents = [r for r, t in tags.items() if t.get("role") == "ablation_grid"]
    assert len(parents) == 2                                         # one per grid
    (second,) = set(parents) - {first}
    assert {r: tags[r]["mlflow.parentRunId"] for r in before} == before     # nothing moved
    kids = {p: {f"{t['variant']}-{t['seed']}": r for r, t in tags.items() if t.get("mlflow.parentRunId") == p}
            for p in (first, second)}
    assert sorted(kids[first]) == sorted(kids[second]) == ["baseline-3", "baseline-4", "full-3", "full-4"]
    # baseline cells have pp_weight 0 either way: same params hash, trained once; the second grid links to them
    for key in ("baseline-3", "baseline-4"):
        link = tags[kids[second][key]]
        assert link["role"] == "cell_link" and link["linked_run_id"] == kids[first][key]
    assert len([r for r, t in tags.items() if t.get("variant") == "baseline" and "params_hash" in t]) == 2
    assert tags[kids[second]["full-3"]]["stage"] == "train" and tags[kids[second]["full-3"]]["dvc_exp_name"] != "workspace"
    report = (project / "reports" / "report.md").read_text()
    assert "`loss.pp_weight` 0.5 (committed 0.3)" in report


def test_two_queued_experiments_run_side_by_side(project: Path):
    """`dvc queue start -j 2`: both finish, each with its own MLflow run, no SQLite lock error,
    and each training takes its share of the cores (train.threads 0). Each experiment runs up to
    the train stage (its target): pretrain and train, the stages that read train.threads."""
    import re
    import time
    before = set(run_tags(project))
    for w in ("0.1", "0.2"):
        dvc(project, "exp", "run", "--queue", "-S", f"loss.pp_weight={w}", "-S", "train.threads=0", "train")
    dvc(project, "queue", "start", "-j", "2")
    deadline = time.time() + 1800
    while re.search(r"\b(Queued|Running)\b", status := dvc(project, "queue", "status").stdout):
        assert time.time() < deadline, status
        time.sleep(5)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "queue", "stop"], cwd=project, env=project_env(),
                   capture_output=True, timeout=120)
    names = re.findall(r"^\S+\s+(\S+)\s.*\bSuccess\b", status, re.M)
    assert len(names) == 2, status
    for name in names:
        log = dvc(project, "queue", "logs", name).stdout
        assert "locked" not in log and "continuing; the DVC outputs remain the record" not in log, log
    tags = run_tags(project)
    info = run_info(project)
    con = sqlite3.connect(project / "mlflow.db")
    pp = dict(con.execute("select run_uuid, value from params where key = 'loss.pp_weight'").fetchall())
    con.close()
    trains = {pp[r]: r for r in set(tags) - before if tags[r].get("stage") == "train"}
    assert sorted(trains) == ["0.1", "0.2"]
    assert sorted(tags[r]["dvc_exp_name"] for r in trains.values()) == sorted(names)
    assert all(info[r][0] == "FINISHED" and tags[r]["torch_threads"] for r in trains.values())
    (s1, e1), (s2, e2) = (info[r][1:3] for r in trains.values())
    assert s1 < e2 and s2 < e1                                          # they trained at the same time


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
