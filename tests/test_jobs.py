"""CPU threads shared by the trainings running on one machine, and the pool that runs ablation
cells side by side (pipeline/jobs.py)."""
import os
import subprocess
import sys
import time

import pytest
import torch

from pipeline.jobs import CoreShare, cores, run_parallel, running

HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from pipeline.jobs import CoreShare
with CoreShare(0, {folder!r}):
    print("registered", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def other_training(tmp_path):
    """Another process registered as a running training in ``tmp_path / 'jobs'``."""
    from tests.helpers import ROOT
    folder = tmp_path / "jobs"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), folder=str(folder))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "registered"
    yield folder, proc
    proc.kill()
    proc.wait()


def test_two_trainings_share_the_cores(other_training):
    folder, proc = other_training
    before = torch.get_num_threads()
    try:
        assert running(folder) == 1
        with CoreShare(0, folder) as share:
            assert running(folder) == 2
            assert torch.get_num_threads() == max(1, cores() // 2) and share.used == [max(1, cores() // 2)]
            proc.kill()                                   # killed: its lock goes with it
            proc.wait()
            share.rebalance()
            assert torch.get_num_threads() == cores() and running(folder) == 1
            assert share.used == ([cores()] if cores() == 1 else [cores() // 2, cores()])
        assert running(folder) == 0 and not list(folder.iterdir())
        with CoreShare(3, folder) as fixed:              # train.threads > 0 wins and registers nothing
            assert torch.get_num_threads() == 3 and fixed.used == [3] and running(folder) == 0
    finally:
        torch.set_num_threads(before)


def test_stale_lock_files_are_not_counted(tmp_path):
    folder = tmp_path / "jobs"
    folder.mkdir()
    (folder / "999999.lock").write_text("")                # left by a process that is gone
    assert running(folder) == 0 and not (folder / "999999.lock").exists()


def _job(job: dict) -> dict:
    """A pool job (module level: the spawned workers import it by name)."""
    if job.get("fail"):
        raise ValueError(f"job {job['i']} failed on purpose")
    start = time.time()
    time.sleep(job.get("sleep", 0.0))
    return {"i": job["i"], "square": job["i"] ** 2, "pid": os.getpid(), "start": start, "end": time.time()}


def test_pool_returns_results_in_job_order_from_two_processes_at_once():
    jobs = [{"i": i, "sleep": 1.0} for i in range(4)]
    seen = []
    out = run_parallel(_job, jobs, 2, on_done=lambda job, r: seen.append(job["i"]))
    assert [r["square"] for r in out] == [0, 1, 4, 9]
    assert sorted(seen) == [0, 1, 2, 3]
    assert os.getpid() not in {r["pid"] for r in out} and len({r["pid"] for r in out}) == 2
    a, b = out[0], out[1]                              # the first two jobs start together
    assert a["start"] < b["end"] and b["start"] < a["end"]


def test_pool_of_one_runs_here_in_order():
    seen = []
    out = run_parallel(_job, [{"i": 3}, {"i": 5}], 1,
                       on_done=lambda job, r: seen.append(job["i"]))
    assert [r["square"] for r in out] == [9, 25] and seen == [3, 5]
    assert {r["pid"] for r in out} == {os.getpid()}


def test_pool_raises_the_first_failure_and_stops_the_others():
    jobs = [{"i": 0, "sleep": 60.0}, {"i": 1, "fail": True}, {"i": 2, "sleep": 60.0}]
    start = time.time()
    with pytest.raises(ValueError, match="job 1 failed on purpose"):
        run_parallel(_job, jobs, 2)
    assert time.time() - start < 30                   # the 60-s job was terminated, not waited for


def test_pool_hands_out_chunks_and_its_workers_end_quietly(capfd):
    """Many short jobs (the prepare stage's label scan) go out in chunks; under the stages' SIGTERM
    handler (pipeline.cli.run), the pool's spawned workers end without a traceback when it closes."""
    import signal

    from pipeline.cli import _terminate
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        out = run_parallel(_job, [{"i": i} for i in range(40)], 2, chunksize=8)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert [r["square"] for r in out] == [i * i for i in range(40)]
    assert len({r["pid"] for r in out}) <= 2 and os.getpid() not in {r["pid"] for r in out}
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def _job_with_a_child(job: dict) -> dict:
    """A pool job that starts a process of its own, as a training's DataLoader workers do."""
    from torch.utils.data import DataLoader
    return {"i": job["i"], "batches": [int(b) for b in DataLoader(range(3), num_workers=1)]}


def test_pool_workers_may_start_processes_of_their_own():
    """An ablation cell whose training has DataLoader workers (train.workers > 0, the paper presets on a
    GPU machine) starts processes inside a pool worker: a daemonic worker may not ("daemonic processes
    are not allowed to have children")."""
    out = run_parallel(_job_with_a_child, [{"i": 0}, {"i": 1}], 2)
    assert out == [{"i": 0, "batches": [0, 1, 2]}, {"i": 1, "batches": [0, 1, 2]}]
