"""CPU threads shared by the trainings running on one machine (pipeline/jobs.py)."""
import subprocess
import sys

import pytest
import torch

from pipeline.jobs import CoreShare, cores, running

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
    from tests.conftest import ROOT
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
