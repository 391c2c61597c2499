"""The ablation grid on a real Slurm cluster (ablation.executor: slurm), through the ablate stage.

A 4-cell tiny grid runs once on this machine (executor local) and once as a Slurm job array; the
Slurm run is disturbed on the way: one cell is preempted (SIGUSR2 through `scancel --signal`, as
Slurm sends it before the time limit: submitit's checkpoint-and-requeue path) and another is killed
outright (SIGKILL to its process, as the kernel's out-of-memory killer does: the stage submits it
again). Each is caught while its training runs, between two checkpoints: the cell's process is
stopped (SIGSTOP) once its checkpoint at step 2 or later exists, the step is read, the signal is
sent, and only then is the process continued, so the disturbance lands at that step however slow
or fast the machine is. The gathered outputs must equal the local grid's bit for bit (metrics,
per-class IoU, curve without its timing columns, model weights), the two disturbed cells must say
that they resumed from exactly that step, MLflow (no tracking server: the stage logs the gathered
cells) must hold one run per cell, running again must submit only unfinished cells, and SIGTERM to
the stage must cancel its jobs, which have left the queue when the stage exits.

Needs a cluster that answers: `sbatch` on PATH and `sinfo` working, on this machine (the test
signals the cells' processes itself). As root: `tools/slurm/start_local_slurm.sh` (it installs
slurm-wlm and munge when they are missing); .ci/run does not start one (docs/CLUSTER.md).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _no_cluster() -> str:
    if shutil.which("sbatch") is None:
        return "no Slurm: 'sbatch' is not on PATH (apt-get install -y slurm-wlm munge; tools/slurm/start_local_slurm.sh)"
    try:
        r = subprocess.run(["sinfo", "--noheader", "--format=%P %a"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the Slurm cluster does not answer (sinfo: {e}); tools/slurm/start_local_slurm.sh starts one"
    if r.returncode != 0 or "up" not in r.stdout.split():
        return ("the Slurm cluster does not answer (sinfo: "
                f"{' '.join((r.stderr or r.stdout).split()) or 'no partition up'}); "
                "tools/slurm/start_local_slurm.sh starts one")
    return ""


REASON = _no_cluster()
if REASON:
    pytest.skip(REASON, allow_module_level=True)

from pipeline.config import build_ablation, build_params  # noqa: E402

ITERATIONS = 12          # a cell's training steps: long enough to be caught between two checkpoints
STAGE_TIMEOUT = 900
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def _params(executor: str, **slurm) -> dict:
    """TINY params (tests/test_pipeline_e2e.py): a 64 px dataset of 16 images, a tiny model, one
    torch thread; 2 variants x 2 seeds; no cell shares the main training (4 steps, cells 12)."""
    raw = json.loads(json.dumps(RAW))
    raw["base"]["seed"] = 3
    raw["data"].update({"crop_size": 64, "scale_min": 0.5, "scale_max": 1.5, "prepare_workers": 1})
    raw["data"]["synthetic"].update({"num_train": 16, "num_test": 4, "image_size": 64})
    raw["model"].update({"hidden_dim": 32, "num_queries": 8, "nheads": 2, "dec_layers": 2, "dim_feedforward": 64,
                         "conv_dim": 32, "mask_dim": 32, "gn_groups": 8, "pretrained": "none"})
    raw["loss"].update({"sim_points": 10, "sim_base_points": 8, "pp_points": 10})
    raw["train"].update({"iterations": 4, "batch_size": 4, "checkpoint_interval": 2, "log_interval": 1, "threads": 1,
                         "diagnostics_interval": 0, "warmup": 0, "freeze": "none", "device": "cpu"})
    raw["eval"]["device"] = "cpu"
    raw["ablation"].update({"seeds": [5, 6], "iterations": ITERATIONS, "workers": 2, "run": ["baseline", "full"],
                            "executor": executor})
    raw["ablation"]["slurm"] = {"partition": "", "gpus_per_cell": 0, "cpus_per_cell": 1, "mem_gb": 1,
                                "time_min": 20, "array_parallelism": 2, **slurm}
    build_ablation(raw["ablation"])
    return raw


def _env(store: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "DVC_ROOT": str(store), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _argv(base: Path, data: Path, params: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stages.ablate", "--params", str(params), "--dataset-dir", str(data / "dataset"),
            "--split-dir", str(data / "split"), "--main-model", str(base / "none.pt"),
            "--checkpoints", str(base / "ck"), "--out", str(base / "out"), "--no-progress", *extra]


def _stage(base: Path, data: Path, params: Path, *extra: str, timeout: float = STAGE_TIMEOUT):
    (base / "store").mkdir(parents=True, exist_ok=True)
    return subprocess.run(_argv(base, data, params, *extra), cwd=ROOT, env=_env(base / "store"), capture_output=True,
                          text=True, timeout=timeout)


def _write(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _ckpt_step(path: Path) -> int:
    import torch
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except (OSError, ValueError, RuntimeError, EOFError, KeyError):
        return -1


def _order(job_id: str) -> tuple[int, ...]:
    return tuple(int(x) for x in job_id.split("_"))


def _jobs(folder: Path) -> list[tuple[str, str]]:
    """(cell key, Slurm job id) of every job submitit submitted into ``folder``, oldest first: a
    cell submitted again (its first job failed, or a later run of the stage) has several."""
    from submitit.core.utils import DelayedSubmission
    out = []
    for pkl in folder.glob("*/*_submitted.pkl"):
        try:
            out.append((DelayedSubmission.load(pkl).args[0].key, pkl.parent.name))
        except Exception:  # noqa: BLE001 - still being written
            continue
    return sorted(out, key=lambda kj: _order(kj[1]))


def _task_of(folder: Path) -> dict[str, str]:
    """cell key -> its newest Slurm job id."""
    return dict(_jobs(folder))


def _step_pids(job_id: str) -> list[int]:
    """The processes of the job's step 0 (srun's task: the cell's Python), from `scontrol listpids`
    (this machine is the job's node)."""
    r = subprocess.run(["squeue", "--noheader", "--format=%A", f"--jobs={job_id}"], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.split():
        return []
    r = subprocess.run(["scontrol", "listpids", r.stdout.split()[0]], capture_output=True, text=True)
    rows = [line.split() for line in r.stdout.splitlines()[1:]]       # PID JOBID STEPID LOCALID GLOBALID
    return [int(row[0]) for row in rows if len(row) >= 3 and row[2] == "0"]


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _proc_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _state_of(pid: int) -> str:
    """'R', 'S', 'T' (stopped), 'Z' (dead, not reaped yet), ... ; '' when gone."""
    return "".join(_proc_status(pid).get("State", "").split()[:1])


def _pending(pid: int, sig: int) -> bool:
    st = _proc_status(pid)
    return any(int(st.get(k, "0").strip() or "0", 16) >> (sig - 1) & 1 for k in ("ShdPnd", "SigPnd"))


def _until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from pipeline.data.splits import build_split, write_split
    from pipeline.data.synthetic import generate_dataset
    root = tmp_path_factory.mktemp("slurm_data")
    p = build_params(_params("local"))
    generate_dataset(root / "dataset", p.data.synthetic, p.base.seed, progress=False)
    split, index = build_split(root / "dataset", "synthetic", 1, progress=False)
    write_split(root / "split", split, index)
    return root


# ----------------------------------------------------------------------------- bad input
def test_a_partition_slurm_rejects_fails_before_anything_is_submitted(tmp_path, data):
    for slurm, why in (({"partition": "no-such-partition"}, "invalid partition"),
                       ({"gpus_per_cell": 1}, "gres")):
        params = _write(tmp_path / "params.yaml", _params("slurm", **slurm))
        r = _stage(tmp_path, data, params, timeout=120)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "error: Slurm rejects the request of a grid cell (ablation.slurm:" in r.stderr
        assert why in r.stderr.lower()
        assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()
        assert not (tmp_path / "store" / "mlflow.db").exists()


# ----------------------------------------------------------------------------- the grid, local and on Slurm
class Disturber(threading.Thread):
    """Preempts one cell (SIGUSR2) and kills another (SIGKILL), each while it trains between its
    checkpoint at step 2 and its last one: the cell's process is stopped first (SIGSTOP), so the step
    read is the step it resumes from; lets the preempted one start again at once."""

    def __init__(self, base: Path):
        super().__init__(daemon=True)
        self.base, self.stop = base, threading.Event()
        self.preempted: tuple[str, str, int] | None = None     # (cell, job id, checkpoint step it was caught at)
        self.killed: tuple[str, str, int] | None = None
        self.released = False
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(f"{type(e).__name__}: {e}")

    def _run(self) -> None:
        while not self.stop.is_set() and not (self.killed and self.released):
            time.sleep(0.2)
            queue = _queue()
            if self.preempted and not self.released and queue.get(self.preempted[1], "").startswith("PENDING"):
                # Slurm holds a requeued job for a while (BeginTime) before it may start again: start it now
                r = subprocess.run(["scontrol", "update", f"JobId={self.preempted[1]}", "StartTime=now"],
                                   capture_output=True, text=True)
                self.released = r.returncode == 0
            if self.killed:
                continue
            done = {c for c, *_ in filter(None, (self.preempted, self.killed))}
            for key, job_id in sorted(_task_of(self.base / "ck" / ".submitit").items(), key=lambda kv: _order(kv[1])):
                if (key not in done and queue.get(job_id, "").startswith("RUNNING")
                        and 2 <= _ckpt_step(self._ckpt(key)) < ITERATIONS and self._disturb(key, job_id)):
                    break

    def _ckpt(self, key: str) -> Path:
        return self.base / "ck" / key / "cell.pt"

    def _disturb(self, key: str, job_id: str) -> bool:
        pids = _step_pids(job_id)
        if not pids:
            return False
        _signal(pids, signal.SIGSTOP)
        try:
            if not _until(lambda: all(_state_of(p) in ("T", "Z", "") for p in pids), 10):
                self.errors.append(f"{job_id}: its processes {pids} did not stop within 10 s")
                return False
            step = _ckpt_step(self._ckpt(key))       # the training cannot write another one now
            if not 2 <= step < ITERATIONS:
                return False
            if self.preempted is None:
                # what Slurm sends before the time limit (submitit's --signal=USR2@90) and submitit's own
                # preemption test sends (SlurmJob._interrupt): submitit checkpoints and requeues the task
                r = subprocess.run(["scancel", "--signal=USR2", job_id], capture_output=True, text=True, timeout=60)
                if r.returncode != 0 or not _until(lambda: any(_pending(p, signal.SIGUSR2) for p in pids), 30):
                    self.errors.append(f"scancel --signal=USR2 {job_id} at step {step}: {r.returncode} "
                                       f"{r.stderr.strip()}; pending on {pids}: "
                                       f"{[_pending(p, signal.SIGUSR2) for p in pids]}")
                    return False
                self.preempted = (key, job_id, step)
            else:
                # out of memory: the kernel kills the process, no signal to catch (it is stopped: it dies now)
                _signal(pids, signal.SIGKILL)
                if not _until(lambda: all(_state_of(p) in ("Z", "") for p in pids), 30):
                    self.errors.append(f"{job_id}: {pids} still there 30 s after SIGKILL")
                    return False
                self.killed = (key, job_id, step)
            return True
        finally:
            _signal(pids, signal.SIGCONT)


def _queue() -> dict[str, str]:
    """job id -> 'STATE REASON' of the grid's jobs in the queue."""
    r = subprocess.run(["squeue", "--noheader", "--array", "--format=%i %T %r", "--name=simformer-cell"],
                       capture_output=True, text=True)
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in r.stdout.splitlines() if " " in line}


@pytest.fixture(scope="module")
def grids(tmp_path_factory, data) -> dict:
    root = tmp_path_factory.mktemp("slurm_grid")
    t0 = time.perf_counter()
    local = _stage(root / "local", data, _write(root / "local.yaml", _params("local")), "--no-mlflow")
    assert local.returncode == 0, local.stdout + local.stderr
    t_local = time.perf_counter() - t0

    base = root / "slurm"
    (base / "store").mkdir(parents=True)
    params = _write(root / "slurm.yaml", _params("slurm"))
    disturber = Disturber(base)
    disturber.start()
    t0 = time.perf_counter()
    try:
        r = _stage(base, data, params)
    finally:
        disturber.stop.set()
        disturber.join(timeout=10)
    print(f"local grid {t_local:.0f} s, Slurm grid {time.perf_counter() - t0:.0f} s")
    assert r.returncode == 0, r.stdout + r.stderr
    return {"root": root, "local": root / "local", "slurm": base, "params": params, "data": data, "run": r,
            "disturber": disturber}


def _cells(base: Path) -> list[str]:
    return sorted(p.name for p in (base / "out").iterdir() if not p.name.startswith("."))


def test_the_slurm_grid_s_outputs_equal_the_local_grid_s(grids):
    import pandas as pd
    import torch
    local, slurm = grids["local"], grids["slurm"]
    cells = _cells(local)
    assert cells == _cells(slurm) == ["baseline-5", "baseline-6", "full-5", "full-6"]
    for key in cells:
        a, b = local / "out" / key, slurm / "out" / key
        assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text()), key
        assert (a / "per_class_iou.csv").read_text() == (b / "per_class_iou.csv").read_text(), key
        timing = ["seconds", "images_per_s"]
        ca, cb = pd.read_csv(a / "curve.csv").drop(columns=timing), pd.read_csv(b / "curve.csv").drop(columns=timing)
        assert len(ca) == ITERATIONS
        pd.testing.assert_frame_equal(ca, cb, check_exact=True)
        ma, mb = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
        assert ma["params_hash"] == mb["params_hash"]
        assert ma["model"].keys() == mb["model"].keys()
        for name in ma["model"]:
            assert torch.equal(ma["model"][name], mb["model"][name]), f"{key}: {name}"
        ja, jb = json.loads((a / "cell.json").read_text()), json.loads((b / "cell.json").read_text())
        assert ja["torch_threads"] == jb["torch_threads"] == 1
        assert {k: v for k, v in ja.items() if k != "run_id"} == {k: v for k, v in jb.items() if k != "run_id"}


def _logs_saying(base: Path, text: str) -> list[Path]:
    return [p for p in (base / "ck" / ".submitit").glob("*/*_log.out") if text in p.read_text(errors="replace")]


def test_a_preempted_and_a_killed_cell_resume_from_their_checkpoints(grids):
    d, out = grids["disturber"], grids["run"].stdout
    assert not d.errors, d.errors
    assert d.preempted and d.killed, f"the cells were not caught mid-training: {out}"
    (pkey, pjob, pstep), (kkey, kjob, kstep) = d.preempted, d.killed
    assert pkey != kkey and 2 <= pstep < ITERATIONS and 2 <= kstep < ITERATIONS
    # the preempted task was requeued by submitit (same job id): no failure, no second job
    assert f"cell {pkey}: job" not in out
    (plog,) = _logs_saying(grids["slurm"], f"cell {pkey}: resumed from its checkpoint at step {pstep}\n")
    assert plog.parent.name == pjob
    err = (plog.parent / f"{pjob}_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in err and "this job is preempted" in err and "DUE TO JOB REQUEUE" in err
    # (submitit's `scontrol requeue` often dies of the SIGTERM with which Slurm ends the requeued task, and the
    # attempt exits 1 with a traceback: the requeue is done by then; the stage ignores that attempt's result)
    # the killed one was submitted again as a job of its own, which resumed
    assert f"cell {kkey}: job {kjob} ended without a result (Slurm state " in out
    assert "submitting it again" in out
    (klog,) = _logs_saying(grids["slurm"], f"cell {kkey}: resumed from its checkpoint at step {kstep}\n")
    assert klog.parent.name != kjob
    assert [j for k, j in _jobs(grids["slurm"] / "ck" / ".submitit") if k == kkey] == [kjob, klog.parent.name]
    # the other two ran through
    for key in set(_cells(grids["slurm"])) - {pkey, kkey}:
        assert not _logs_saying(grids["slurm"], f"cell {key}: resumed"), key


def _store(base: Path) -> tuple[list, int]:
    import sqlite3
    con = sqlite3.connect(base / "store" / "mlflow.db")
    try:
        runs = sorted(con.execute("select r.run_uuid, r.status, t.value from runs r join tags t on "
                                  "t.run_uuid = r.run_uuid and t.key = 'params_hash'").fetchall())
        (metrics,) = con.execute("select count(*) from metrics").fetchone()
    finally:
        con.close()
    return runs, metrics


def test_without_a_tracking_server_the_stage_logs_each_gathered_cell_once(grids):
    base = grids["slurm"]
    runs, metrics = _store(base)
    assert [s for _, s, _ in runs] == ["FINISHED"] * 4 and len({h for *_, h in runs}) == 4
    ids = {json.loads((base / "out" / k / "cell.json").read_text())["run_id"] for k in _cells(base)}
    assert ids == {r for r, *_ in runs}
    assert "logged the 4 gathered cells to MLflow" in grids["run"].stdout
    assert metrics > 4 * ITERATIONS


def test_running_again_submits_only_unfinished_cells(grids):
    base, data, params = grids["slurm"], grids["data"], grids["params"]
    before = _store(base)
    r = _stage(base, data, params)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("finished before: gathered") == 4 and "submitted" not in r.stdout
    assert _store(base) == before                                    # nothing logged twice

    shutil.rmtree(base / "out" / "full-6")                           # its checkpoint is finished: evaluated only
    metrics = (grids["local"] / "out" / "full-6" / "metrics.json").read_text()
    r = _stage(base, data, params)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("finished before: gathered") == 3 and "submitted 1 cell as Slurm job array" in r.stdout
    assert json.loads((base / "out" / "full-6" / "metrics.json").read_text()) == json.loads(metrics)
    assert _store(base) == before


def test_sigterm_to_the_stage_cancels_its_jobs(grids):
    from pipeline.executor import _state
    base, data, params = grids["slurm"], grids["data"], grids["params"]
    cells = ("baseline-5", "baseline-6")
    for key in cells:                                   # two cells to train again from scratch
        shutil.rmtree(base / "out" / key)
        shutil.rmtree(base / "ck" / key)
    folder = base / "ck" / ".submitit"
    known = {j for _, j in _jobs(folder)}
    logs = base / "sigterm.out", base / "sigterm.err"
    with logs[0].open("w") as o, logs[1].open("w") as e:
        proc = subprocess.Popen(_argv(base, data, params), cwd=ROOT, env=_env(base / "store"), stdout=o, stderr=e)
    try:
        deadline, jobs, queue = time.monotonic() + 120, [], {}
        while time.monotonic() < deadline and proc.poll() is None:
            jobs = sorted((j for _, j in _jobs(folder) if j not in known), key=_order)
            queue = _queue()
            # the stage is past its submission (watching the queue), both cells run
            if ("submitted 2 cells as Slurm job array" in logs[0].read_text() and len(jobs) == 2
                    and all(queue.get(j, "").startswith("RUNNING") for j in jobs)):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the 2 cells were not running after 120 s: jobs {jobs}, queue {queue}, stage "
                        f"{proc.poll()}: {logs[0].read_text()}{logs[1].read_text()}")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = logs[0].read_text(), logs[1].read_text()
    assert proc.returncode == 130, out + err
    assert f"cancelling 2 Slurm jobs: {' '.join(jobs)}" in err
    # the stage waited for them: once it has exited, its jobs have left the queue
    assert not set(jobs) & set(_queue()), _queue()
    assert [_state(j) for j in jobs] == ["CANCELLED", "CANCELLED"]
    # nothing half-written: no temporary folder left; a cell is absent, or complete when it finished
    # within Slurm's KillWait after the cancel (the cells ignore SIGTERM: submitit's handler)
    left = sorted(p.name for p in (base / "out").iterdir())
    assert [n for n in left if n not in cells] == ["full-5", "full-6"], left
    for key in set(cells) & set(left):
        a, b = grids["local"] / "out" / key, base / "out" / key
        assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    for key in cells:
        ck = base / "ck" / key / "cell.pt"
        assert not ck.exists() or 1 <= _ckpt_step(ck) <= ITERATIONS       # a whole checkpoint, if any
