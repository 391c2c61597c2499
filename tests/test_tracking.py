"""MLflow tracking against a throw-away SQLite store under tmp_path."""
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import build_params, flatten, params_hash, to_dict
from pipeline.tracking import (
    RunTracker,
    TrackingError,
    experiment_name,
    find_run,
    git_commit,
    store_root,
    tracking_uri,
)
from tests.conftest import file_params

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
    assert not tr.resumed
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
    assert exp.artifact_location == (root.resolve() / "mlartifacts" / EXP).as_uri()
    art_dir = root / "mlartifacts" / EXP / rid / "artifacts"
    assert (art_dir / "params.yaml").read_text() == text
    assert (art_dir / "reports" / "metrics.json").read_text() == '{"mIoU": 1.0}\n'

    # resume by params hash: same run, no error on params already logged, missing ones added
    flat2 = {**flat, "extra.key": 3, "eval.max_images": 7}   # changed value of a logged param is kept
    tr2 = RunTracker(root, EXP)
    with tr2:
        assert tr2.start(h, "train", flat2, text, {"stage": "train"}) == rid
        assert tr2.resumed
        tr2.log_metrics({"loss": 0.5}, step=30)
    run = c.get_run(rid)
    assert run.info.status == "FINISHED"
    assert run.data.params["extra.key"] == "3"
    assert run.data.params["eval.max_images"] == "0"
    assert run.data.tags["resume_count"] == "1"
    assert len(c.search_runs([exp.experiment_id])) == 1
    assert find_run(root, EXP, h) == rid
    assert find_run(root, EXP, h, status="FINISHED") == rid
    assert find_run(root, EXP, h, status="RUNNING") is None
    assert find_run(root, EXP, "0000") is None
    assert find_run(root, "no-such-experiment", h) is None

    # the evaluate stage reopens the FINISHED training run; logged tags are kept, new ones added
    with RunTracker(root, EXP) as ev:
        assert ev.start(h, "eval", flat, text, {"stage": "evaluate", "eval_images": 5},
                        include_finished=True) == rid
        ev.log_metrics({"mIoU": 42.0})
    run = c.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.metrics["mIoU"] == 42.0
    assert run.data.tags["stage"] == "train" and run.data.tags["eval_images"] == "5"
    assert run.data.tags["resume_count"] == "2"

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
    tr2 = RunTracker(tmp_path, EXP)
    assert tr2.start(h, "train", flat, "x: 1\n", {}, resume=False) != rid
    tr.finish("FINISHED")
    tr.finish("FAILED")                                              # idempotent
    assert c.get_run(rid).info.status == "FINISHED"


def test_mid_run_logging_failure_policy(tmp_path, monkeypatch):
    import pipeline.tracking as t
    monkeypatch.setattr(t, "_RETRY_SLEEPS", (0.0,))
    _, flat, h = _params()
    tr = RunTracker(tmp_path, EXP)
    tr.start(h, "train", flat, "", {})

    def broken(*a, **k):
        raise RuntimeError("database is locked")

    with monkeypatch.context() as m:
        m.setattr(tr.client, "log_batch", broken)
        tr.log_metrics({"loss": 1.0}, step=1)                # default: warn, record, carry on
        assert len(tr.failures) == 1 and "database is locked" in tr.failures[0]
        assert str(tmp_path / "mlflow.db") in tr.failures[0]
        tr.strict = True
        with pytest.raises(TrackingError, match="log_metrics"):
            tr.log_metrics({"loss": 1.0}, step=2)
    tr.finish()
    assert _client(tmp_path).get_run(tr.run_id).info.status == "FINISHED"


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
    with pytest.raises(TrackingError, match=str(bad / "mlflow.db")):
        find_run(bad, EXP, h)


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
