"""Checkpoint files: a crash while writing keeps the previous checkpoint, and a checkpoint that
would run code when unpickled is refused."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from tests.helpers import leftovers


def test_checkpoint_writer_crash_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from pipeline.engine import checkpoint as ck
    path = tmp_path / "checkpoints" / "train.pt"
    ck.save_checkpoint(path, {"step": 2, "w": torch.ones(3)})
    before = path.read_bytes()
    real_save = torch.save

    def dies_half_way(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:                     # the new file is half written ...
            fh.truncate(Path(f).stat().st_size // 2)
        raise OSError(5, "Input/output error")        # ... when the write fails

    monkeypatch.setattr(ck.torch, "save", dies_half_way)
    with pytest.raises(OSError, match="Input/output error"):
        ck.save_checkpoint(path, {"step": 4, "w": torch.zeros(3)})
    assert path.read_bytes() == before
    assert ck.load_checkpoint(path)["step"] == 2
    assert leftovers(path.parent, {"train.pt"}) == []


def test_checkpoint_with_code_is_refused(tmp_path):
    from pipeline.engine.checkpoint import load_checkpoint
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "payload": _Evil()}, path)
    with pytest.raises(ValueError, match=f"checkpoint '{re.escape(str(path))}' cannot be loaded safely"):
        load_checkpoint(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_step_reads_step_only_for_these_params(tmp_path):
    """One reader of "how far is this training": the grid's "cell done" and --resume-from's
    "the local checkpoint is further on" both use it."""
    from pipeline.engine.checkpoint import checkpoint_step, save_checkpoint
    from pipeline.grid import finished_checkpoint
    path = tmp_path / "train.pt"
    assert checkpoint_step(path, "abc") == -1                       # no file
    save_checkpoint(path, {"step": 7, "params_hash": "abc"})
    assert checkpoint_step(path, "abc") == 7
    assert checkpoint_step(path, "other") == -1                     # other params
    assert finished_checkpoint(path, "abc", 7) is True
    assert finished_checkpoint(path, "abc", 8) is False
    path.write_bytes(b"not a checkpoint")
    assert checkpoint_step(path, "abc") == -1                       # unreadable
    assert finished_checkpoint(path, "abc", 7) is False
