"""Resumable checkpoints in the MLflow run (train.mlflow_checkpoints) and --resume-from runs:/<id>.

Against a SQLite store and against a real `mlflow server`: the newest K checkpoints stay in the
run after more checkpoint intervals, checkpoints/latest.json names the newest; a training killed
with SIGKILL and resumed from its run (as another machine sharing the store would) gives the
same bits as a local resume from the same checkpoint; the refusals name what is wrong.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.config import build_params, params_hash
from pipeline.tracking import RunTracker, experiment_name, tracking_uri, training_callbacks
from tests.helpers import files_under, run_stage, small_params, train_argv, write_params
from tests.test_resume import _env, _last_logged_step, _loss_columns, _project, _train_cmd

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")  # inside mlflow's sqlalchemy store

EXP = experiment_name("synthetic", 1)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for k in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(k, raising=False)
    yield
    mlflow.set_tracking_uri(None)           # the stages run in-process leave no store behind for later tests


def _raw(iterations: int, keep: int, **train) -> dict:
    return small_params(train={"iterations": iterations, "checkpoint_interval": 2, "log_interval": 1, "threads": 1,
                               "mlflow_checkpoints": keep, **train})


def _listed(client, root: Path | None, run_id: str) -> list[str]:
    """The run's artifacts under checkpoints/ (from the store root: the embedded store's locations are relative)."""
    with contextlib.chdir(root) if root is not None else contextlib.nullcontext():
        return sorted(f.path for f in client.list_artifacts(run_id, "checkpoints"))


def _latest(client, root: Path | None, run_id: str, dst: Path) -> dict:
    with contextlib.chdir(root) if root is not None else contextlib.nullcontext():
        return json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="checkpoints/latest.json", dst_path=str(dst),
            tracking_uri=client.tracking_uri)).read_text())


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = (torch.load(x, weights_only=True)["model"] for x in (a, b))
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def _latest_on_disk(project: Path) -> dict | None:
    for f in (project / "mlartifacts").glob("*/*/artifacts/checkpoints/latest.json"):
        with contextlib.suppress(OSError, ValueError):      # being written
            return json.loads(f.read_text())
    return None


def test_killed_training_resumed_from_its_run_equals_a_local_resume(tmp_path, tiny_data, mlflow_template,
                                                                     monkeypatch, capsys):
    raw = _raw(8, 2)
    phash = params_hash(build_params(raw))
    a = _project(tmp_path / "a", tiny_data, raw)             # the machine that is killed; its store is shared
    shutil.copy(mlflow_template, a / "mlflow.db")
    victim = subprocess.Popen(_train_cmd(a), cwd=a, env=_env(a), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 240
        while True:                  # a checkpoint at step >= 4 in MLflow, and a later step already logged
            latest = _latest_on_disk(a)
            if latest and latest["step"] >= 4 and _last_logged_step(a) > latest["step"]:
                break
            assert victim.poll() is None, f"training ended before it could be killed:\n{victim.communicate()[1]}"
            assert time.monotonic() < deadline, "no MLflow checkpoint past step 4 within 240 s"
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
    con = sqlite3.connect(a / "mlflow.db")
    ((run_id, status),) = con.execute("select run_uuid, status from runs").fetchall()
    con.close()
    assert status == "RUNNING"                               # nobody could mark it
    client = mlflow.MlflowClient(tracking_uri(a))
    latest = _latest(client, a, run_id, tmp_path / "dl")
    k = latest["step"]
    assert 4 <= k < 8 and latest == {"step": k, "file": f"step-{k:06d}.pt", "params_hash": phash}

    # the local resume from the same checkpoint (fetched with MLflow's own API), without MLflow
    c = _project(tmp_path / "c", tiny_data, raw)
    (c / "data/checkpoints").mkdir()
    with contextlib.chdir(a):
        got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"checkpoints/{latest['file']}",
                                                  dst_path=str(tmp_path / "dl"), tracking_uri=tracking_uri(a))
    shutil.copy(got, c / "data/checkpoints/train.pt")
    monkeypatch.chdir(c)
    assert run_stage("train", *_train_cmd(c)[3:], "--no-mlflow") == 0
    assert f"(resumed from {k})" in capsys.readouterr().out

    # another machine sharing the store: --resume-from runs:/<id>
    b = _project(tmp_path / "b", tiny_data, raw)
    monkeypatch.chdir(b)
    monkeypatch.setenv("DVC_ROOT", str(a))
    assert run_stage("train", *_train_cmd(b)[3:], "--resume-from", f"runs:/{run_id}") == 0
    out = capsys.readouterr().out
    assert f"resuming from runs:/{run_id}: {latest['file']} (step {k}, run RUNNING)" in out and \
        f"(resumed from {k})" in out, out

    # the same bits and the same curve as the local resume
    _same_weights(c / "data/train/model.pt", b / "data/train/model.pt")
    pd.testing.assert_frame_equal(_loss_columns(c / "reports/train_curve.csv"),
                                  _loss_columns(b / "reports/train_curve.csv"), check_exact=True)
    assert files_under(b / "data/checkpoints") == ["train.pt"]           # no temporary folder left
    # the killed run went on (as a local resume does), keeping the newest 2 checkpoints
    assert _listed(client, a, run_id) == ["checkpoints/latest.json", "checkpoints/step-000006.pt",
                                          "checkpoints/step-000008.pt"]
    assert _latest(client, a, run_id, tmp_path / "dl2") == {"step": 8, "file": "step-000008.pt", "params_hash": phash}
    art = a / "mlartifacts" / EXP / run_id / "artifacts" / "checkpoints"
    assert (art / "step-000008.pt").read_bytes() == (b / "data/checkpoints/train.pt").read_bytes()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resume_count"] == "1"
    assert "resumed_from_run_id" not in run.data.tags
    assert len(client.search_runs([run.info.experiment_id])) == 1
    by_step: dict[int, set] = {}
    for m in client.get_metric_history(run_id, "loss"):
        by_step.setdefault(m.step, set()).add(m.value)
    assert sorted(by_step) == list(range(1, 9)) and all(len(v) == 1 for v in by_step.values()), by_step
    curve = pd.read_csv(b / "reports/train_curve.csv")
    assert [by_step[s].pop() for s in range(1, 9)] == pytest.approx(list(curve["loss"]), rel=1e-6)


def test_a_tracking_server_keeps_the_newest_and_resumes_a_finished_run_in_a_new_run(
        tmp_path, tiny_data, mlflow_server, monkeypatch, capsys):
    url, srv = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    raw = _raw(6, 2)
    phash, params = params_hash(build_params(raw)), write_params(tmp_path / "params.yaml", raw)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_stage("train", *train_argv(a, tiny_data, params)) == 0
    client = mlflow.MlflowClient(url)
    exp_id = client.get_experiment_by_name(EXP).experiment_id
    (source,) = client.search_runs([exp_id])
    rid = source.info.run_id
    # three intervals, the newest two kept: step 2 was deleted on the server's artifact store
    assert _listed(client, None, rid) == ["checkpoints/latest.json", "checkpoints/step-000004.pt",
                                          "checkpoints/step-000006.pt"]
    assert sorted(f.name for f in (srv / "artifacts").rglob("step-*.pt")) == ["step-000004.pt", "step-000006.pt"]
    assert _latest(client, None, rid, tmp_path / "dl") == {"step": 6, "file": "step-000006.pt", "params_hash": phash}
    assert next((srv / "artifacts").rglob("step-000006.pt")).read_bytes() == \
        (a / "data/checkpoints/train.pt").read_bytes()
    assert (source.info.status, source.data.tags.get("resume_count")) == ("FINISHED", None)
    capsys.readouterr()

    # another machine resumes from the finished run: its checkpoint is the last step, so nothing trains
    assert run_stage("train", *train_argv(b, tiny_data, params), "--resume-from", f"runs:/{rid}") == 0
    out = capsys.readouterr().out
    assert f"resuming from runs:/{rid}: step-000006.pt (step 6, run FINISHED)" in out and "(resumed from 6)" in out
    _same_weights(a / "data/train/model.pt", b / "data/train/model.pt")
    runs = {r.info.run_id: r for r in client.search_runs([exp_id])}
    (new_id,) = set(runs) - {rid}
    new = runs[new_id]
    assert new.info.status == "FINISHED"
    assert (new.data.tags["resumed_from_run_id"], new.data.tags["resumed_from_step"]) == (rid, "6")
    # the new run carries the checkpoint's curve; it wrote no checkpoint of its own (no step trained)
    assert [(m.step, m.value) for m in client.get_metric_history(new_id, "loss")] == \
        [(m.step, m.value) for m in client.get_metric_history(rid, "loss")]
    assert _listed(client, None, new_id) == []
    # the finished source run is history: untouched
    after = client.get_run(rid)
    assert (after.info.status, after.info.end_time) == (source.info.status, source.info.end_time)
    assert (after.data.tags, after.data.params, after.data.metrics) == \
        (source.data.tags, source.data.params, source.data.metrics)
    assert _listed(client, None, rid) == ["checkpoints/latest.json", "checkpoints/step-000004.pt",
                                          "checkpoints/step-000006.pt"]


def test_logger_keeps_k_in_a_sqlite_store_and_resume_refusals_name_the_problem(tmp_path, tiny_data, store, capsys):
    from pipeline.config import flatten, to_dict
    from pipeline.engine.train import train
    from pipeline.io import read_json
    from pipeline.jobs import CoreShare
    other = build_params(_raw(6, 2, lr=0.002))
    raw = _raw(6, 2)
    here, theirs = params_hash(build_params(raw)), params_hash(other)
    assert here != theirs
    # the training loop's callbacks, three checkpoint intervals, the newest two kept
    ckpt = tmp_path / "other" / "train.pt"
    with RunTracker(store, EXP) as tr, CoreShare(1) as cores:
        rid = tr.start(theirs, "other", flatten(to_dict(other)), "other: params\n", {})
        train(other, tiny_data / "dataset", read_json(tiny_data / "split/split.json"),
              read_json(tiny_data / "split/index.json"), ckpt, progress=False, **training_callbacks(tr, cores, other))
    client = mlflow.MlflowClient(tracking_uri(store))
    assert _listed(client, store, rid) == ["checkpoints/latest.json", "checkpoints/step-000004.pt",
                                           "checkpoints/step-000006.pt"]
    art = store / "mlartifacts" / EXP / rid / "artifacts" / "checkpoints"
    assert sorted(f.name for f in art.iterdir()) == ["latest.json", "step-000004.pt", "step-000006.pt"]
    assert json.loads((art / "latest.json").read_text()) == {"step": 6, "file": "step-000006.pt",
                                                              "params_hash": theirs}
    assert (art / "step-000006.pt").read_bytes() == ckpt.read_bytes()
    assert files_under(ckpt.parent) == ["train.pt"]
    with RunTracker(store, EXP) as tr:          # a run without checkpoints
        bare = tr.start("no-checkpoints", "bare", {}, "", {})

    params = write_params(tmp_path / "params.yaml", raw)

    def refused(uri: str, out: Path, params: Path = params) -> str:
        code = run_stage("train", *train_argv(out, tiny_data, params), "--resume-from", uri)
        err = capsys.readouterr().err
        assert code == 1, err
        assert not (out / "data/train").exists() and not (out / "reports").exists()
        return err

    err = refused(f"runs:/{rid}", tmp_path / "x")
    assert (f"run {rid}'s checkpoint belongs to other params (params hash {theirs}; these params: {here}): "
            f"train.lr 0.002 (run) vs 0.001 (here) - train with the run's params") in err, err
    assert files_under(tmp_path / "x") == []
    err = refused(f"runs:/{bare}", tmp_path / "x")
    assert f"run {bare} has no checkpoint (no artifact checkpoints/latest.json" in err, err
    err = refused("runs:/" + "0" * 32, tmp_path / "x")
    assert f"the MLflow store {store.resolve() / 'mlflow.db'} has no run {'0' * 32}" in err, err
    err = refused(f"models:/{EXP}/1", tmp_path / "x")
    assert f"--resume-from takes runs:/<run_id> (an MLflow run whose training logged checkpoints), not 'models:/{EXP}/1'" \
        in err, err
    # a local checkpoint of these params further on than the run's latest stays, and is named
    ahead = tmp_path / "y" / "data/checkpoints/train.pt"
    ahead.parent.mkdir(parents=True)
    torch.save({"params_hash": theirs, "step": 7}, ahead)
    before = ahead.read_bytes()
    err = refused(f"runs:/{rid}", tmp_path / "y", write_params(tmp_path / "other.yaml", _raw(6, 2, lr=0.002)))
    assert (f"the checkpoint '{ahead}' of these params is at step 7, further on than run {rid}'s latest "
            "(step-000006.pt, step 6); it is kept") in err, err
    assert ahead.read_bytes() == before and files_under(ahead.parent) == ["train.pt"]
    assert len(client.search_runs([client.get_experiment_by_name(EXP).experiment_id])) == 2   # no run was started


def test_a_grid_cell_keeps_its_checkpoint_in_its_own_run(tmp_path, tiny_data, store):
    from pipeline.config import build_ablation
    from pipeline.grid import plan_cells, run_cell
    raw = _raw(4, 1)
    raw["ablation"].update({"seeds": [5], "run": ["baseline"], "iterations": 3, "workers": 1})
    (job,), _, _ = plan_cells(build_params(raw), raw, build_ablation(raw["ablation"]), "",
                              dataset_dir=tiny_data / "dataset", split_dir=tiny_data / "split", init=None,
                              main_model=tmp_path / "none.pt", checkpoints=tmp_path / "ck", out=tmp_path / "out",
                              cores=1, mlflow=True, progress=False)
    assert not job.shared
    run_cell(job)
    rid = json.loads((job.out / "cell.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri(store))
    # checkpoints after steps 2 and 3 (the last), the newest one kept
    assert _listed(client, store, rid) == ["checkpoints/latest.json", "checkpoints/step-000003.pt"]
    assert _latest(client, store, rid, tmp_path / "dl") == {"step": 3, "file": "step-000003.pt",
                                                            "params_hash": params_hash(job.params)}
    art = store / "mlartifacts" / EXP / rid / "artifacts" / "checkpoints" / "step-000003.pt"
    assert art.read_bytes() == job.checkpoint.read_bytes()
    assert files_under(job.checkpoint.parent) == ["cell.pt"]
