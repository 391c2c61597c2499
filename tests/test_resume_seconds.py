"""After an interruption and a resume, the training curve's ``seconds`` goes on from the run's
elapsed time at the checkpoint instead of restarting at 0 (the report's training-time table and
the curve's last row are the run's whole training time)."""
from __future__ import annotations

import json
import time

import pytest

from tests.support_tiny import make_tiny_data, tiny_params

PAUSE = 2.0          # seconds added before step 2 is logged: step 2's elapsed time is at least this


class Interrupt(Exception):
    pass


def test_seconds_continue_after_resume(tmp_path):
    from pipeline.config import build_params
    from pipeline.engine.checkpoint import load_checkpoint
    from pipeline.engine.train import train
    data = make_tiny_data(tmp_path / "data")
    split = json.loads((data / "split/split.json").read_text())
    index = json.loads((data / "split/index.json").read_text())
    p = build_params(tiny_params(train={"iterations": 4, "checkpoint_interval": 2, "log_interval": 1}))
    ckpt = tmp_path / "ck.pt"

    def first(step, rec):
        if step == 1:
            time.sleep(PAUSE)
        if step == 3:                       # after the checkpoint of step 2: as if killed here
            raise Interrupt

    with pytest.raises(Interrupt):
        train(p, data / "dataset", split, index, ckpt, on_log=first, progress=False)
    saved = load_checkpoint(ckpt)
    assert saved["step"] == 2
    at_checkpoint = saved["history"][-1]["seconds"]
    assert at_checkpoint >= PAUSE

    _, out = train(p, data / "dataset", split, index, ckpt, progress=False)
    assert out.resumed_from == 2
    steps = [r["step"] for r in out.history]
    seconds = [r["seconds"] for r in out.history]
    assert steps == [1, 2, 3, 4]
    assert seconds[:2] == [r["seconds"] for r in saved["history"]]          # the checkpoint's rows as they were
    assert seconds[2] > at_checkpoint and seconds == sorted(seconds), seconds
    assert seconds[3] - at_checkpoint < out.seconds + 1e-6                   # only this process's time was added
