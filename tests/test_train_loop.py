"""The training loop: the per-step seed, the learning-rate schedule, TrainState save/load, the
diagnostics hook, a non-finite loss or gradient (the stage stops, the last good checkpoint stays),
and bad training data (named before or when it is read)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.config import build_params
from pipeline.engine.checkpoint import TrainState, load_checkpoint
from pipeline.engine.train import FastPath, build_training, step_seed, train, train_step
from tests.helpers import (copy_data, files_under, run_stage, runs_in_store, small_params, step_batch, train_argv,
                           write_params)


def _split_index(data):
    return (json.loads((data / "split/split.json").read_text()),
            json.loads((data / "split/index.json").read_text()))


def test_step_seed_formula():
    assert step_seed(6, 0) == 6_000_018
    assert step_seed(6, 5) == 6_000_023
    assert step_seed(6, 5, rank=1) == 6_000_023 + 2 ** 48
    assert len({step_seed(s, k, r) for s in (0, 1) for k in range(4) for r in range(3)}) == 24


def test_learning_rate_warms_up_linearly_then_follows_poly():
    """lr(s) = lr * min(1, (s + 1) / (warmup + 1)) * (1 - s / iterations) ** poly_power."""
    from pipeline.engine.train import build_optimizer
    raw = small_params(train={"lr": 0.01, "warmup": 3, "iterations": 10, "poly_power": 1.0})
    p = build_params(raw)
    model = torch.nn.Linear(2, 2)
    opt, sched = build_optimizer(p, model, torch.nn.Module(), FastPath())
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.01 * min(1, (s + 1) / 4) * (1 - s / 10) for s in range(10)]
    assert lrs == pytest.approx(expected)
    assert lrs[:4] == pytest.approx([0.0025, 0.0045, 0.006, 0.007])
    # warmup 0 is the paper's schedule: the poly factor alone from the first step
    opt, sched = build_optimizer(build_params(small_params(train={"lr": 0.01, "warmup": 0, "iterations": 10})),
                                 model, torch.nn.Module(), FastPath())
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_train_state_round_trip_continues_exactly(tmp_path, tiny_data):
    """Two steps, save, two more; a fresh state loaded from the file takes the same two steps to
    the same weights (RNG states included: the model has dropout)."""
    from pipeline.engine.train import build_train_loader
    p = build_params(small_params(model={"dropout": 0.1}))
    split, index = _split_index(tiny_data)
    dev = torch.device("cpu")
    batches = list(build_train_loader(p, tiny_data / "dataset", index, 0, 4, dev))

    a = build_training(p, split, dev, FastPath())
    for b in batches[:2]:
        train_step(a, b)
    a.state.history.append({"step": 2})
    a.state.save(tmp_path / "ck.pt", params_hash="x")
    ck = load_checkpoint(tmp_path / "ck.pt")
    assert ck["step"] == 2 and ck["params_hash"] == "x" and ck["history"] == [{"step": 2}]
    assert {"model", "criterion", "optimizer", "scheduler", "rng_cpu", "rng_cuda"} <= set(ck)
    for b in batches[2:]:
        train_step(a, b)

    c = build_training(p, split, dev, FastPath())
    c.state.load_state_dict(ck)
    assert c.state.step == 2 and c.state.history == [{"step": 2}]
    for b in batches[2:]:
        train_step(c, b)
    assert c.state.step == 4
    for k, v in a.state.model.state_dict().items():
        assert torch.equal(v, c.state.model.state_dict()[k]), k
    assert isinstance(c.state, TrainState)


def test_diagnostics_join_the_record_and_do_not_change_training(tmp_path, tiny_data):
    p = build_params(small_params(model={"dropout": 0.1}, train={"log_interval": 2}))
    split, index = _split_index(tiny_data)
    seen = []

    def diagnostics(state, batch):
        seen.append((state.step, tuple(batch["image"].shape)))
        torch.rand(1000)                          # draws from the global stream: must not shift training
        return {"diag_step": float(state.step)}

    _, plain = train(p, tiny_data / "dataset", split, index, tmp_path / "a.pt", progress=False)
    _, diag = train(p, tiny_data / "dataset", split, index, tmp_path / "b.pt", progress=False,
                    diagnostics=diagnostics)
    assert [s for s, _ in seen] == [2, 4] and seen[0][1][0] == p.train.batch_size
    assert [r["diag_step"] for r in diag.history] == [2.0, 4.0]
    for r0, r1 in zip(plain.history, diag.history, strict=True):
        assert {k: v for k, v in r1.items() if k not in ("diag_step", "images_per_s", "seconds")} == \
               {k: v for k, v in r0.items() if k not in ("images_per_s", "seconds")}
    assert "diag_step" in load_checkpoint(tmp_path / "b.pt")["history"][-1]


def test_loss_window_means_over_its_own_steps():
    from pipeline.engine.train import _LossWindow
    w = _LossWindow(1)
    for x in (1.0, 2.0, 6.0):
        w.add(torch.tensor(x), {"loss_ce": torch.tensor(x / 2), "loss_ce_0": torch.tensor(9.0)}, 4)
    means, rate = w.flush()
    assert means == pytest.approx({"loss_ce": 1.5, "loss": 3.0}) and list(means) == ["loss_ce", "loss"]
    assert rate > 0 and w.steps == 0 and w.sums == {}


# ============================================================================ non-finite loss


def _criterion_fault(monkeypatch, at_call: int, how: str):
    """Make ``train``'s criterion misbehave on its ``at_call``-th call (1-based = curve step)."""
    import pipeline.engine.train as T
    real = T.build_criterion
    calls = {"n": 0}

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    def build(*a, **k):
        crit = real(*a, **k)
        forward = crit.forward

        def faulty(*fa, **fk):
            losses = forward(*fa, **fk)
            calls["n"] += 1
            if calls["n"] == at_call:
                if how == "nan_loss":
                    losses["loss_ce"] = losses["loss_ce"] * float("nan")
                else:                                   # finite loss, non-finite gradients
                    losses["loss_ce"] = NanGrad.apply(losses["loss_ce"])
            return losses

        crit.forward = faulty
        return crit

    monkeypatch.setattr(T, "build_criterion", build)


def _record_checkpoints(monkeypatch) -> list[bytes]:
    import pipeline.engine.checkpoint as C           # TrainState.save writes through it
    real, saved = C.save_checkpoint, []

    def save(path, state):
        real(path, state)
        saved.append(Path(path).read_bytes())

    monkeypatch.setattr(C, "save_checkpoint", save)
    return saved


def test_nonfinite_loss_stops_stage_keeps_last_checkpoint(tmp_path, tiny_data, store, monkeypatch, capsys):
    params = write_params(tmp_path / "params.yaml", small_params(train={"iterations": 6}))
    _criterion_fault(monkeypatch, at_call=3, how="nan_loss")
    saved = _record_checkpoints(monkeypatch)
    out = tmp_path / "out"
    code = run_stage("train", *train_argv(out, tiny_data, params))
    err = capsys.readouterr().err
    assert code == 1
    assert re.search(r"non-finite loss at step 3\b.*loss_ce", err), err
    ckpt = out / "data/checkpoints/train.pt"
    assert str(ckpt) in err
    assert len(saved) == 1 and ckpt.read_bytes() == saved[0]       # the step-2 checkpoint, unchanged
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    assert files_under(out) == ["data", "data/checkpoints", "data/checkpoints/train.pt"]  # no model, no curve
    (run,) = runs_in_store(store)
    assert run["status"] == "FAILED" and run["loss_steps"] == [1, 2]


@pytest.mark.parametrize("at_step, message", [
    (4, r"non-finite weights after step 4\b"),      # poisoned on a checkpoint step: not written
    (3, r"non-finite weights at step 4\b"),         # poisoned in between: the next step says why
])
def test_nonfinite_gradients_are_never_checkpointed(at_step, message, tmp_path, tiny_data, monkeypatch):
    """A finite loss whose gradients are NaN poisons the weights: the error names the step, and
    the checkpoint due at that step must not overwrite the last good one."""
    from pipeline.config import build_params
    from pipeline.engine.train import NonFiniteLossError, train
    p = build_params(small_params(train={"iterations": 6}))
    split = json.loads((tiny_data / "split/split.json").read_text())
    index = json.loads((tiny_data / "split/index.json").read_text())
    _criterion_fault(monkeypatch, at_call=at_step, how="nan_grad")
    saved = _record_checkpoints(monkeypatch)
    ckpt = tmp_path / "train.pt"
    with pytest.raises(NonFiniteLossError, match=message) as ei:
        train(p, tiny_data / "dataset", split, index, ckpt, progress=False)
    assert str(ckpt) in str(ei.value)
    assert ckpt.read_bytes() == saved[0]
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ============================================================================ bad data


def test_label_size_mismatch_at_train_time_names_the_label(tmp_path, tiny_data):
    from pipeline.config import build_params
    from pipeline.engine.train import train
    raw = small_params()
    data = copy_data(tiny_data, tmp_path / "d")
    index = json.loads((data / "split/index.json").read_text())
    split = json.loads((data / "split/split.json").read_text())
    lab = data / "dataset" / index["train"][step_batch(data, 0, raw)[0]]["label"]
    cv2.imwrite(str(lab), np.zeros((40, 64), np.uint8))
    with pytest.raises(ValueError, match=re.escape(f"label '{lab}' is 64x40 but its image is 64x64")):
        train(build_params(raw), data / "dataset", split, index, tmp_path / "ck.pt", progress=False)
    assert not (tmp_path / "ck.pt").exists()


def test_no_usable_training_image_fails_before_anything(tmp_path, tiny_data):
    from pipeline.config import build_params
    from pipeline.engine.train import train
    index = json.loads((tiny_data / "split/index.json").read_text())
    split = json.loads((tiny_data / "split/split.json").read_text())
    for e in index["train"]:
        e["usable"] = False
    with pytest.raises(ValueError, match="no usable images"):
        train(build_params(small_params()), tiny_data / "dataset", split, index, tmp_path / "ck.pt", progress=False)
    assert files_under(tmp_path) == []
