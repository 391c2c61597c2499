"""MLflow tracking against a throw-away SQLite store under tmp_path."""
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.tracking import sync_grid
from pipeline.config import build_params, flatten, params_hash, to_dict
from pipeline.repo import git_commit, store_root
from pipeline.tracking import (
    RunTracker,
    TrackingError,
    experiment_name,
    tracking_uri,
    using_store,
)
from tests.helpers import file_params, small_params, train_argv, write_params

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")  # inside mlflow's sqlalchemy store

EXP = experiment_name("synthetic", 1)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for k in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # nothing MLflow may drop in the cwd lands in the repository


def _params(**train):
    p = build_params(file_params({"train": {"iterations": 500, **train}}))
    return p, flatten(to_dict(p)), params_hash(p)


def _client(root):
    return mlflow.MlflowClient(tracking_uri=tracking_uri(root))


def test_names_and_uri(tmp_path):
    assert EXP == "simformer-synthetic-split1"
    assert experiment_name("coco_stuff_10k", 7) == "simformer-coco_stuff_10k-split7"
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri(tmp_path).startswith("sqlite:////")


def test_start_log_and_resume(tmp_path, monkeypatch):
    root = tmp_path / "store"
    root.mkdir()
    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc")
    p, flat, h = _params()
    text = "train:\n  iterations: 500\n"
    tr = RunTracker(root, EXP)
    rid = tr.start(h, "train", flat, text, {"stage": "train"})
    tr.log_metrics({"loss": 1.5, "loss_cls": 0.5, "skip": None}, step=10)
    tr.log_metrics({"loss": 1.0}, step=20)
    art = tmp_path / "metrics.json"
    art.write_text('{"mIoU": 1.0}\n')
    tr.log_artifact(art, "reports")
    # a crash: the run is left RUNNING

    c = _client(root)
    run = c.get_run(rid)
    assert run.info.status == "RUNNING"
    assert run.data.params["train.iterations"] == "500"
    assert run.data.params["data.url"] == ""
    assert len(run.data.params) == len(flat)
    assert run.data.tags["params_hash"] == h
    assert run.data.tags["dvc_exp_name"] == "exp-abc"
    assert run.data.tags["git_commit"] == "unknown"          # tmp_path is not a git repository
    assert run.data.tags["stage"] == "train"
    assert run.info.run_name == "train"
    assert [m.value for m in c.get_metric_history(rid, "loss")] == [1.5, 1.0]
    assert "skip" not in run.data.metrics
    exp = c.get_experiment_by_name(EXP)
    assert exp.artifact_location == f"mlartifacts/{EXP}"                 # relative to the store root
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    art_dir = root / "mlartifacts" / EXP / rid / "artifacts"
    assert (art_dir / "params.yaml").read_text() == text
    assert (art_dir / "reports" / "metrics.json").read_text() == '{"mIoU": 1.0}\n'

    # resume by params hash: same run, no error on params already logged, missing ones added
    flat2 = {**flat, "extra.key": 3, "eval.max_images": 7}   # changed value of a logged param is kept
    tr2 = RunTracker(root, EXP)
    with tr2:
        assert tr2.start(h, "train", flat2, text, {"stage": "train"}) == rid
        tr2.log_metrics({"loss": 0.5}, step=30)
    run = c.get_run(rid)
    assert run.info.status == "FINISHED"
    assert run.data.params["extra.key"] == "3"
    assert run.data.params["eval.max_images"] == "0"
    assert run.data.tags["resume_count"] == "1"
    assert len(c.search_runs([exp.experiment_id])) == 1

    # the evaluate stage reopens the FINISHED training run: results and new tags are added, its
    # status, start and end times and resume count stay as training left them
    time.sleep(0.05)
    with RunTracker(root, EXP) as ev:
        assert ev.start(h, "eval", flat, text, {"stage": "evaluate", "eval_images": 5},
                        include_finished=True) == rid
        ev.log_metrics({"mIoU": 42.0})
    after = c.get_run(rid)
    assert after.info.status == "FINISHED" and after.data.metrics["mIoU"] == 42.0
    assert (after.info.start_time, after.info.end_time) == (run.info.start_time, run.info.end_time)
    assert after.data.tags["stage"] == "train" and after.data.tags["eval_images"] == "5"
    assert after.data.tags["resume_count"] == "1"
    with pytest.raises(RuntimeError, match="reopen fails"):          # an error while reopened changes nothing
        with RunTracker(root, EXP) as ev:
            ev.start(h, "eval", flat, text, {}, include_finished=True)
            raise RuntimeError("reopen fails")
    assert c.get_run(rid).info.status == "FINISHED"

    # without include_finished a FINISHED run is never resumed; other params hash -> other run
    with RunTracker(root, EXP) as tr3:
        rid3 = tr3.start(h, "train", flat, text, {})
    assert rid3 != rid
    _, flat4, h4 = _params(iterations=7)
    with RunTracker(root, EXP) as tr4:
        assert tr4.start(h4, "train", flat4, text, {}) not in (rid, rid3)
    assert len(c.search_runs([exp.experiment_id])) == 3


def test_failed_on_exception_then_resumed(tmp_path):
    _, flat, h = _params()
    with pytest.raises(RuntimeError, match="boom"):
        with RunTracker(tmp_path, EXP) as tr:
            rid = tr.start(h, "train", flat, "x: 1\n", {})
            raise RuntimeError("boom")
    c = _client(tmp_path)
    assert c.get_run(rid).info.status == "FAILED"
    tr = RunTracker(tmp_path, EXP)
    assert tr.start(h, "train", flat, "x: 1\n", {}) == rid          # failed runs resume
    assert c.get_run(rid).info.status == "RUNNING"
    tr.finish("FINISHED")
    tr.finish("FAILED")                                              # idempotent
    assert c.get_run(rid).info.status == "FINISHED"


def test_mid_run_logging_failure_policy(tmp_path, monkeypatch, caplog):
    _, flat, h = _params()
    tr = RunTracker(tmp_path, EXP)
    tr.start(h, "train", flat, "", {})

    def broken(*a, **k):
        raise RuntimeError("database is locked")

    with monkeypatch.context() as m:
        m.setattr(tr.client, "log_batch", broken)
        tr.log_metrics({"loss": 1.0}, step=1)                # default: warn and carry on
        (warning,) = [r.getMessage() for r in caplog.records if "log_metrics failed" in r.getMessage()]
        assert "database is locked" in warning and f"MLflow store {tmp_path / 'mlflow.db'}:" in warning
        tr.strict = True
        with pytest.raises(TrackingError, match="log_metrics"):
            tr.log_metrics({"loss": 1.0}, step=2)
    tr.finish()
    assert _client(tmp_path).get_run(tr.run_id).info.status == "FINISHED"


def _nvml_gpus() -> int:
    """How many GPUs NVML (nvidia-ml-py, the package MLflow reads NVIDIA GPUs through) finds; 0 without a
    GPU or its driver."""
    import pynvml
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def test_system_metrics_read_the_gpu_only_where_there_is_one(tmp_path, monkeypatch, capfd):
    """With nvidia-ml-py installed (requirements.txt), a training run's system metrics are CPU, memory,
    disk and network, plus per-GPU ones where NVML finds a GPU; without one nothing fails or warns."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    mlflow_log = logging.getLogger("mlflow")                 # MLflow's loggers do not propagate to the root
    mlflow_log.addHandler(handler)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    _, flat, h = _params()
    tr = RunTracker(tmp_path, EXP)
    try:
        rid = tr.start(h, "train", flat, "", {"stage": "train"})
        tr.start_system_metrics()
        monitors = sorted(type(m).__name__ for m in tr._monitor.monitors)
        deadline = time.monotonic() + 30
        while tr._monitor._logging_step < 2 and time.monotonic() < deadline:     # two samples published
            time.sleep(0.05)
        tr.finish()
    finally:
        mlflow_log.removeHandler(handler)
    run = _client(tmp_path).get_run(rid)
    assert run.info.status == "FINISHED"
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage", "system/disk_usage_megabytes"} <= system, system
    assert 0 <= run.data.metrics["system/cpu_utilization_percentage"] <= 100
    gpu = {k for k in system if k.startswith("system/gpu_")}
    if _nvml_gpus():
        assert "GPUMonitor" in monitors
        assert {"system/gpu_0_utilization_percentage", "system/gpu_0_memory_usage_megabytes"} <= gpu, system
    else:
        assert monitors == ["CPUMonitor", "DiskMonitor", "NetworkMonitor"]
        assert not gpu, gpu
    warned = [f"{r.name}: {r.getMessage()}" for r in records if r.levelno >= logging.WARNING]
    assert not warned, warned
    err = capfd.readouterr().err
    assert "nvml" not in err.lower() and "gpu" not in err.lower(), err


def test_store_root_resolution(tmp_path, monkeypatch):
    store = tmp_path / "repo"
    elsewhere = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "run1"
    elsewhere.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(elsewhere)], check=True)   # temp runs are git checkouts
    monkeypatch.chdir(elsewhere)
    assert store_root() == elsewhere.resolve()                           # git top level without DVC_ROOT
    assert store_root(tmp_path) == tmp_path.resolve()                    # not a repository: cwd itself
    monkeypatch.setenv("DVC_ROOT", str(store))
    assert store_root() == store.resolve()
    assert git_commit(tmp_path) == "unknown"
    _, flat, h = _params()
    with RunTracker(store_root(), EXP) as tr:
        tr.start(h, "train", flat, "", {})
    assert (store / "mlflow.db").is_file() and not (elsewhere / "mlflow.db").exists()
    assert not (elsewhere / "mlruns").exists() and not (elsewhere / "mlartifacts").exists()


def test_unreachable_store_names_path(tmp_path):
    _, flat, h = _params()
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(TrackingError, match=str(missing / "mlflow.db")):
        RunTracker(missing, EXP).start(h, "train", flat, "", {})
    assert not missing.exists()
    bad = tmp_path / "bad"
    (bad / "mlflow.db").mkdir(parents=True)                          # a folder where the db should be
    with pytest.raises(TrackingError, match="not a regular file") as e:
        RunTracker(bad, EXP).start(h, "train", flat, "", {})
    assert str(bad / "mlflow.db") in str(e.value)


def test_locked_store_fails_fast(tmp_path):
    _, flat, h = _params()
    db = tmp_path / "mlflow.db"
    holder = sqlite3.connect(str(db), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(TrackingError, match="locked") as e:
            RunTracker(tmp_path, EXP, timeout=0.2).start(h, "train", flat, "", {})
        assert str(db) in str(e.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_pipeline_imports_without_mlflow(tmp_path):
    code = ("import sys; sys.modules['mlflow'] = None\n"
            "import pipeline.tracking, pipeline.report, pipeline.engine.metrics\n"
            "from pipeline.tracking import TrackingError, RunTracker\n"
            "try:\n"
            f"    pipeline.tracking.open_client({str(tmp_path)!r})\n"
            "except TrackingError as e:\n"
            "    assert 'not installed' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('expected TrackingError')\n")
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "mlflow.db").exists()


def _cell(variant, seed, **loss):
    p = build_params(file_params({"base": {"seed": seed}, "loss": loss}))
    return {"variant": variant, "seed": seed, "params_hash": params_hash(p), "params_flat": flatten(to_dict(p)),
            "params_text": f"# {variant}-{seed}\n", "metrics": {"mIoU": 10.0 + seed, "mIoU_novel": 5.0, "pixels": None}}


def _children(client, exp_id, parent):
    runs = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    return {f"{r.data.tags['variant']}-{r.data.tags['seed']}": r for r in runs}


def test_grids_never_steal_each_others_children(tmp_path):
    """Grid 1 (baseline, full); then grid 2 changes one loss weight of `full`: it links to the
    cached baseline cell instead of moving it, and both parents keep all their children."""
    root = tmp_path
    grid1 = [_cell("baseline", 6, comp_weight=0.0), _cell("full", 6)]
    own = {}
    for cell in grid1:                                  # the ablate stages' own runs
        with RunTracker(root, EXP) as tr:
            own[cell["variant"]] = tr.start(cell["params_hash"], f"{cell['variant']}-seed6", cell["params_flat"],
                                            cell["params_text"], {"stage": "ablate"})
            tr.log_metrics(cell["metrics"])
    c = _client(root)
    exp_id = c.get_experiment_by_name(EXP).experiment_id
    g1 = sync_grid(root, EXP, "g1", {"cells": 2}, grid1, {"full.mIoU.mean": 16.0, "full.mIoU.std": 1.5}, "x: 1\n")
    assert g1["children"] == {"baseline-seed6": own["baseline"], "full-seed6": own["full"]}
    parent1 = c.get_run(g1["parent"])
    assert parent1.data.metrics == {"full.mIoU.mean": 16.0, "full.mIoU.std": 1.5}
    assert parent1.data.params["cells"] == "2" and parent1.info.status == "FINISHED"

    grid2 = [grid1[0], _cell("full", 6, pp_weight=0.5)]          # the changed cell trains: its own run
    with RunTracker(root, EXP) as tr:
        new_full = tr.start(grid2[1]["params_hash"], "full-seed6", grid2[1]["params_flat"], "", {"stage": "ablate"})
    g2 = sync_grid(root, EXP, "g2", {"cells": 2}, grid2, {}, "x: 2\n")
    assert g2["parent"] != g1["parent"] and g2["children"]["full-seed6"] == new_full
    link = c.get_run(g2["children"]["baseline-seed6"])
    assert link.info.run_id != own["baseline"] and link.info.status == "FINISHED"
    assert link.data.tags["linked_run_id"] == own["baseline"] and link.data.tags["role"] == "cell_link"
    assert "params_hash" not in link.data.tags                        # never found as the cell's own run
    assert link.data.metrics == {"mIoU": 16.0, "mIoU_novel": 5.0}
    assert {k: r.info.run_id for k, r in _children(c, exp_id, g1["parent"]).items()} == {
        "baseline-6": own["baseline"], "full-6": own["full"]}        # grid 1 keeps every child
    assert {k: r.info.run_id for k, r in _children(c, exp_id, g2["parent"]).items()} == {
        "baseline-6": link.info.run_id, "full-6": new_full}
    assert c.get_run(own["baseline"]).data.tags["grid_id"] == "g1"

    n = len(c.search_runs([exp_id]))
    assert sync_grid(root, EXP, "g1", {"cells": 2}, grid1, {}, "x: 1\n") == g1     # again: nothing new
    assert sync_grid(root, EXP, "g2", {"cells": 2}, grid2, {}, "x: 2\n") == g2
    assert len(c.search_runs([exp_id])) == n
    assert c.get_run(g1["parent"]).info.end_time == parent1.info.end_time        # reopened, not re-finished

    restored = [_cell("baseline", 7, comp_weight=0.0)]       # outputs from DVC's run cache: no run anywhere
    g3 = sync_grid(root, EXP, "g3", {"cells": 1}, restored, {}, "x: 3\n")
    run = c.get_run(g3["children"]["baseline-seed7"])
    assert run.data.tags["restored_from"] == "dvc_run_cache" and run.data.tags["mlflow.parentRunId"] == g3["parent"]
    assert run.data.metrics == {"mIoU": 17.0, "mIoU_novel": 5.0}
    art = root / "mlartifacts" / EXP / run.info.run_id / "artifacts" / "params.yaml"
    assert art.read_text() == "# baseline-7\n"                                    # the cell's effective params


def test_copied_store_reads_its_own_artifacts(tmp_path, monkeypatch):
    _, flat, h = _params()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    with RunTracker(a, EXP) as tr:
        rid = tr.start(h, "train", flat, "copy: me\n", {})
    shutil.copytree(a, b)
    shutil.rmtree(a)                                   # the original is gone
    monkeypatch.chdir(b)                               # `make ui` / load_model run from the repository root
    got = mlflow.artifacts.download_artifacts(run_id=rid, artifact_path="params.yaml", tracking_uri=tracking_uri(b),
                                              dst_path=str(tmp_path / "dl"))
    assert Path(got).read_text() == "copy: me\n"
    monkeypatch.chdir(tmp_path)
    with using_store(b):
        assert mlflow.get_tracking_uri() == tracking_uri(b) and Path.cwd() == b.resolve()
    assert "MLFLOW_TRACKING_URI" not in os.environ and Path.cwd() == tmp_path   # nothing leaks out
    with RunTracker(b, EXP) as tr:                     # logging into the copy lands in the copy
        assert tr.start(h, "train", flat, "", {}, include_finished=True) == rid
        (tmp_path / "more.txt").write_text("more\n")
        tr.log_artifact(tmp_path / "more.txt", "extra")
    assert (b / "mlartifacts" / EXP / rid / "artifacts" / "extra" / "more.txt").read_text() == "more\n"
    assert not a.exists()


def test_tracking_uri_env_wins_and_a_training_logs_to_the_server(tmp_path, mlflow_server, tiny_data):
    import numpy as np
    url, srv = mlflow_server
    project = tmp_path / "project"
    project.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "DVC_ROOT": str(project), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    params = write_params(tmp_path / "params.yaml", small_params())
    r = subprocess.run([sys.executable, "-m", "stages.train", *map(str, train_argv(project, tiny_data, params))],
                       cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "failed" not in r.stderr, r.stderr
    assert not (project / "mlflow.db").exists() and not (project / "mlartifacts").exists()   # nothing embedded
    c = mlflow.MlflowClient(url)
    exp = c.get_experiment_by_name(EXP)
    (run,) = c.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "full-seed3 (main)"
    assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert run.data.params["train.iterations"] == "4"
    assert (srv / "artifacts").is_dir() and list((srv / "artifacts").rglob("model.pt"))   # the server stores them
    os.environ["MLFLOW_TRACKING_URI"] = url
    (tmp_path / "loaded").mkdir()
    try:
        assert tracking_uri(project) == url
        with using_store(project):
            # into tmp_path: without dst_path mlflow leaves the 45 MB download in the system temp dir
            model = mlflow.pyfunc.load_model(f"models:/{EXP}/1", dst_path=str(tmp_path / "loaded"))
    finally:
        mlflow.set_tracking_uri(None)          # clears the process's URI and the variable
    image = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    labels = model.predict(image)
    assert labels.shape == (40, 52) and labels.dtype == np.int64 and 0 <= labels.min() <= labels.max() < 24
