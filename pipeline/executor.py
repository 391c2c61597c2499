"""The ablation grid's cells on a Slurm cluster, through submitit (``ablation.executor: slurm``).

The cells that are not finished yet (:func:`finished`: ``<out>/<cell>/cell.json`` holds the cell's
params hash) are submitted as one job array (``map_array``), ``ablation.slurm`` saying what each
cell asks for. Each array task runs :func:`pipeline.grid.run_cell` on a compute node and writes
the cell's outputs to ``job.out`` on the shared filesystem, exactly as a local cell does; this
process only watches the queue and gathers the results, in job order.

Faults:

* preemption or the time limit: Slurm sends SIGUSR2 (``--signal=USR2@90``); submitit's handler
  calls :meth:`CellTask.checkpoint` and requeues the task (same job id), which resumes from the
  cell's training checkpoint (``job.checkpoint``, written every ``train.checkpoint_interval``
  steps). That is not a failure.
* a task that ends without a result (an exception, ``scancel``, out of memory, a node failure) is
  a failure: the cell is submitted once more as a job of its own and resumes from its checkpoint.
  A second failure stops the grid: the other jobs are cancelled and :class:`GridError` names the
  cell, both job ids, the last state and the log file.
* this process interrupted (Ctrl-C, SIGTERM, which ``pipeline.cli.run`` turns into
  KeyboardInterrupt): every job still queued or running is cancelled (``scancel``), and it exits
  once they have left the queue (at most :data:`CANCEL_WAIT_S`; a cancelled cell runs on for Slurm's
  KillWait, and must not write its checkpoint or outputs after the stage has exited).
  An interrupt that arrives while ``sbatch`` runs is held until submitit has the job ids
  (:func:`_interrupts_held`): else the jobs of that ``sbatch`` would run on, unknown to this process.
* running again: finished cells are gathered from disk, only the others are submitted.

Before anything is submitted (or written) :func:`check_slurm` says in one error when ``sbatch``
is missing or Slurm rejects the request (``sbatch --test-only``: an unknown partition, more GPUs,
memory or time than the partition has).

Job state comes from ``squeue`` and ``scontrol`` (no ``sacct``: a cluster without accounting
works too); the results from submitit's result files in the job folder.
"""
from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import submitit

from .config import SlurmConfig, params_hash
from .grid import RESULT_KEYS, CellJob, run_cell

JOB_NAME = "simformer-cell"
POLL_S = 3.0          # seconds between two looks at the queue
LOST_AFTER_S = 60.0   # a task gone from the queue, COMPLETED, but no result file yet (a slow shared filesystem)
ATTEMPTS = 2          # a cell that fails this many times stops the grid
CANCEL_WAIT_S = 120.0  # on an interrupt: the longest wait for the cancelled jobs to leave the queue


class GridError(RuntimeError):
    """The grid cannot run on Slurm, or one of its cells failed twice."""


class CellTask(submitit.helpers.Checkpointable):
    """One cell as a submitit job. On preemption / time-out submitit calls :meth:`checkpoint`
    (inherited: the same call again) and requeues the task; :func:`run_cell` then resumes from
    the cell's own training checkpoint."""

    def __call__(self, job: CellJob) -> dict:
        return run_cell(job)


# ----------------------------------------------------------------------------- before anything
def request(cfg: SlurmConfig) -> dict:
    """submitit's ``SlurmExecutor`` parameters of one cell (empty or zero settings: the cluster's default)."""
    out = {"job_name": JOB_NAME, "time": cfg.time_min, "nodes": 1, "cpus_per_task": cfg.cpus_per_cell,
           "array_parallelism": cfg.array_parallelism}
    if cfg.partition:
        out["partition"] = cfg.partition
    if cfg.gpus_per_cell:
        out["gpus_per_node"] = cfg.gpus_per_cell
    if cfg.mem_gb:
        out["mem"] = f"{cfg.mem_gb}G"
    return out


def _sbatch_args(cfg: SlurmConfig) -> list[str]:
    names = {"partition": "--partition", "time": "--time", "nodes": "--nodes", "cpus_per_task": "--cpus-per-task",
             "gpus_per_node": "--gpus-per-node", "mem": "--mem"}
    return [f"{names[k]}={v}" for k, v in request(cfg).items() if k in names]


def check_slurm(cfg: SlurmConfig, timeout: float = 60.0) -> None:
    """Raise :class:`GridError` when ``sbatch`` is not on PATH or Slurm would reject one cell's
    request (``sbatch --test-only``: nothing is submitted)."""
    if shutil.which("sbatch") is None:
        raise GridError("ablation.executor is 'slurm' but 'sbatch' is not on PATH: run the stage on a machine "
                        "that submits to your Slurm cluster (a login node), or set ablation.executor: local")
    what = ", ".join(f"{k} {getattr(cfg, k)!r}" for k in ("partition", "gpus_per_cell", "cpus_per_cell", "mem_gb",
                                                         "time_min"))
    cmd = ["sbatch", "--test-only", *_sbatch_args(cfg), "--wrap", "true"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise GridError(f"Slurm did not answer within {timeout:g} s ({' '.join(cmd)}): is the cluster up "
                        "(sinfo)?") from None
    if r.returncode != 0:
        why = " ".join((r.stderr or r.stdout).split()) or f"exit status {r.returncode}"
        raise GridError(f"Slurm rejects the request of a grid cell (ablation.slurm: {what}): {why}")


def finished(job: CellJob) -> bool:
    """The cell's outputs are complete for its params: ``job.out/cell.json`` holds its params hash
    (the folder is written atomically: with cell.json come metrics, curve and model)."""
    import json
    try:
        cell = json.loads((job.out / "cell.json").read_text())
    except (OSError, ValueError):
        return False
    return cell.get("params_hash") == params_hash(job.params) and (job.shared or (job.out / "model.pt").is_file())


def gathered_result(job: CellJob) -> dict:
    """A finished cell's summary (as :func:`run_cell` returns it) read back from ``job.out``."""
    import json
    m = json.loads((job.out / "metrics.json").read_text())
    return {k: m[k] for k in RESULT_KEYS} | {"seconds": 0.0, "shared": job.shared, "gathered": True}


# ----------------------------------------------------------------------------- the queue
def _queued(job_ids: list[str]) -> set[str] | None:
    """Which of these job ids (``<array>_<task>`` or ``<job>``) Slurm still has queued or running;
    None when squeue does not answer (then nothing is taken for gone)."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    if not bases:
        return set()
    try:
        r = subprocess.run(["squeue", "--noheader", "--array", "--format=%i", f"--jobs={','.join(bases)}"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        # every job id already purged from the controller's memory: nothing is queued
        return set() if "Invalid job id" in r.stderr else None
    return {line.strip() for line in r.stdout.splitlines() if line.strip()}


def _state(job_id: str) -> str:
    """The job's last state from ``scontrol`` (COMPLETED, CANCELLED, FAILED, OUT_OF_MEMORY, ...), or
    'UNKNOWN' once the controller forgot it."""
    try:
        r = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "UNKNOWN"
    for field in r.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return "UNKNOWN"


@contextlib.contextmanager
def _interrupts_held(reraise: bool = True) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM for the block (a submission or the cancelling of jobs); on leaving
    it, one that came is raised as KeyboardInterrupt (``reraise``) or dropped (already unwinding).
    Only the main thread receives signals; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    before = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    if came and reraise:
        raise KeyboardInterrupt(f"signal {came[0]} (held during a Slurm submission)")


def _cancel(jobs, wait_s: float = CANCEL_WAIT_S, poll_s: float = 1.0) -> None:
    """``scancel`` each job, then wait until squeue no longer lists them: a cancelled cell runs on
    for Slurm's KillWait (submitit's handler ignores the SIGTERM), and once this returns none of
    them writes its checkpoint or outputs any more. A second Ctrl-C stops the wait, not the scancels."""
    with _interrupts_held(reraise=False):
        for j in jobs:
            try:
                j.cancel(check=False)
            except OSError:
                pass
    ids, deadline, said = {j.job_id for j in jobs}, time.monotonic() + wait_s, False
    try:
        while True:
            queued = _queued(sorted(ids))
            left = ids if queued is None else ids & queued
            if not left:
                return
            if time.monotonic() > deadline:
                print(f"warning: cancelled Slurm jobs still in the queue after {wait_s:g} s: "
                      + " ".join(sorted(left)), file=sys.stderr)
                return
            if not said:
                print("waiting for the cancelled jobs to end (Slurm's KillWait)", file=sys.stderr)
                said = True
            time.sleep(poll_s)
    except KeyboardInterrupt:
        return


def _log(j) -> Path:
    return j.paths.stderr


# ----------------------------------------------------------------------------- the grid
def run_cells_slurm(jobs: list[CellJob], cfg: SlurmConfig, folder: Path,
                    on_done: Callable[[CellJob, dict], None] | None = None, *, poll_s: float = POLL_S,
                    lost_after_s: float = LOST_AFTER_S, say: Callable[[str], None] = print) -> list[dict]:
    """Run the unfinished ``jobs`` as one Slurm job array (submitit's files under ``folder``, on the
    shared filesystem) and gather every cell's result, in job order. ``on_done(job, result)`` is
    called here as each cell ends (``result["gathered"]``: it was finished before this run)."""
    check_slurm(cfg)
    done = on_done or (lambda job, result: None)
    results: dict[str, dict] = {}
    todo = []
    for job in jobs:
        if finished(job):
            results[job.key] = gathered_result(job)
            done(job, results[job.key])
        else:
            todo.append(job)
    if todo:
        _run_array(todo, cfg, Path(folder), results, done, poll_s, lost_after_s, say)
    return [results[j.key] for j in jobs]


def _executor(cfg: SlurmConfig, folder: Path) -> "submitit.SlurmExecutor":
    ex = submitit.SlurmExecutor(folder=folder / "%j")
    root = Path(__file__).resolve().parents[1]      # the project: importable on the compute nodes
    ex.update_parameters(**request(cfg), setup=[f'export PYTHONPATH="{root}${{PYTHONPATH:+:$PYTHONPATH}}"'])
    return ex


def _run_array(todo: list[CellJob], cfg: SlurmConfig, folder: Path, results: dict, done, poll_s: float,
               lost_after_s: float, say) -> None:
    ex = _executor(cfg, folder)
    task = CellTask()
    active: dict[str, dict] = {}     # cell key -> {"job", "sub" (submitit job), "attempt", "gone_since", "failures"}
    try:
        with _interrupts_held():
            subs = ex.map_array(task, todo)
            for job, sub in zip(todo, subs):
                active[job.key] = {"job": job, "sub": sub, "attempt": 1, "gone_since": None, "failures": []}
        say(f"submitted {len(subs)} cell{'s' if len(subs) > 1 else ''} as Slurm job array {subs[0].job_id.split('_')[0]}"
            f" ({cfg.array_parallelism} at a time; logs: {folder})")
        while active:
            time.sleep(poll_s)
            queued = _queued([a["sub"].job_id for a in active.values()])
            if queued is None:          # squeue did not answer: look again later
                continue
            for key, a in list(active.items()):
                sub, job = a["sub"], a["job"]
                if sub.job_id in queued:
                    # still queued or running, or requeued (preemption): a result file there may be a
                    # stale one of the attempt before the requeue
                    a["gone_since"] = None
                    continue
                if sub.paths.result_pickle.exists():
                    try:
                        result = sub.result()
                    except Exception as e:  # noqa: BLE001 - the cell's own error, with its trace
                        _failed(ex, task, a, f"raised {_last_line(e)}", say)
                        continue
                    results[key] = result
                    del active[key]
                    done(job, result)
                    continue
                state = _state(sub.job_id)
                a["gone_since"] = a["gone_since"] or time.monotonic()
                if state == "COMPLETED" and time.monotonic() - a["gone_since"] < lost_after_s:
                    continue        # its result file may not be visible here yet
                _failed(ex, task, a, f"ended without a result (Slurm state {state})", say)
    except BaseException:
        left = [a["sub"] for a in active.values()]
        if left:
            print(f"cancelling {len(left)} Slurm job{'s' if len(left) > 1 else ''}: "
                  + " ".join(s.job_id for s in left), file=sys.stderr)
            _cancel(left, poll_s=min(poll_s, 1.0))
        raise


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
    trace = [ln for ln in lines if not ln.startswith(("Job (task", "You can check", "or at paths", "  - "))]
    return (trace[-1] if trace else type(e).__name__).strip()


def _failed(ex, task, a: dict, why: str, say) -> None:
    """A failed attempt: submit the cell again (it resumes from its checkpoint), or stop the grid."""
    job, sub = a["job"], a["sub"]
    a["failures"].append(f"job {sub.job_id} {why} (log: {_log(sub)})")
    if a["attempt"] >= ATTEMPTS:
        raise GridError(f"ablation cell {job.key} failed {a['attempt']} times; the grid is stopped: "
                        + "; ".join(a["failures"]))
    say(f"cell {job.key}: job {sub.job_id} {why}; submitting it again (it resumes from its checkpoint; "
        f"log: {_log(sub)})")
    with _interrupts_held():
        a["sub"] = ex.submit(task, job)
    a["attempt"] += 1
    a["gone_since"] = None
