"""What must hold on a GPU: bf16 against fp32, matching, predict, checkpoints across devices, exact
resume, NCCL. Marked ``cuda``; skipped without a CUDA device. ``python -m tools.gpu_check`` runs
them on the GPU machine and keeps their report.

``SIMFORMER_CUDA_TESTS_DEVICE=cpu`` runs them with the CPU standing in for the GPU (each comparison
is then CPU against CPU): a dry run of the code paths before spending GPU time, not a check of CUDA.

Only torch, torchvision, numpy, scipy, OpenCV and PyYAML are imported (the GPU machine has no DVC
or MLflow). Determinism settings of the resume test: its subprocesses set
``CUBLAS_WORKSPACE_CONFIG=:4096:8``, ``torch.use_deterministic_algorithms(True, warn_only=True)``
and ``torch.backends.cudnn.benchmark = False``; a few CUDA kernels (bilinear upsampling's backward)
have no deterministic version, so the test compares the resumed run with the spread of two
uninterrupted runs instead of demanding equal bits.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAND_IN = os.environ.get("SIMFORMER_CUDA_TESTS_DEVICE", "") == "cpu"
DEVICE = "cpu" if STAND_IN else "cuda"
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not STAND_IN and not torch.cuda.is_available(),
                                 reason="needs a CUDA device (SIMFORMER_CUDA_TESTS_DEVICE=cpu: a CPU dry run)")]
BF16_TOLERANCE = 0.05       # relative difference of each loss term, bf16 autocast against fp32, first step

TINY = {"base": {"seed": 5},
        "data": {"crop_size": 64, "scale_min": 0.5, "scale_max": 1.5,
                 "synthetic": {"num_train": 16, "num_test": 4, "image_size": 64}},
        "model": {"pretrained": "none", "hidden_dim": 32, "num_queries": 8, "nheads": 2, "dec_layers": 2,
                  "dim_feedforward": 64, "conv_dim": 32, "mask_dim": 32, "gn_groups": 8},
        "loss": {"sim_points": 10, "sim_base_points": 8, "pp_points": 10},
        "train": {"iterations": 4, "batch_size": 4, "checkpoint_interval": 2, "log_interval": 1, "threads": 1,
                  "freeze": "none", "warmup": 0, "diagnostics_interval": 0, "device": "auto", "compile": False},
        "eval": {"device": "auto"}}


def tiny_raw(**over) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for groups in (TINY, over):
        for g, values in groups.items():
            for k, v in values.items():
                if isinstance(v, dict):
                    raw[g][k].update(v)
                else:
                    raw[g][k] = v
    raw.pop("ablation", None)
    return raw


def tiny_params(**over):
    from pipeline.config import build_params
    return build_params(tiny_raw(**over))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pipeline.engine.benchmark import make_dataset
    p = tiny_params()
    return make_dataset(tmp_path_factory.mktemp("cuda_data"), p, 16, 4, 64)


def _batch(p, ds, index, step: int = 0) -> dict:
    from pipeline.engine.train import build_train_loader
    loader = build_train_loader(p, ds, index, step, step + 1, torch.device("cpu"))
    return next(iter(loader))


def test_bf16_autocast_step_matches_fp32(data):
    """The first step's losses from the same weights and batch: finite under bf16 autocast (+
    channels_last, TF32), each term within BF16_TOLERANCE of fp32."""
    from pipeline.engine.train import FastPath, build_training, train_step
    ds, split, index = data
    p = tiny_params()
    batch = _batch(p, ds, index)
    dev = torch.device(DEVICE)
    out = {}
    for name, fast in (("fp32", FastPath()), ("bf16", FastPath(amp=not STAND_IN, channels_last=not STAND_IN,
                                                                tf32=not STAND_IN, fused_adamw=not STAND_IN))):
        tr = build_training(p, split, dev, fast)
        loss, losses = train_step(tr, batch)
        assert torch.isfinite(loss), (name, losses)
        out[name] = {k: float(v) for k, v in losses.items()}
    assert out["fp32"].keys() == out["bf16"].keys()
    rel = {k: abs(out["bf16"][k] - v) / max(abs(v), 1e-3) for k, v in out["fp32"].items()}
    assert max(rel.values()) <= BF16_TOLERANCE, rel


def test_batched_matching_on_the_device_equals_the_cpu_assignment():
    from pipeline.losses.matcher import HungarianMatcher
    g = torch.Generator().manual_seed(0)
    b, q, k, h = 4, 16, 12, 32
    outputs = {"pred_logits": torch.randn(b, q, k + 1, generator=g), "pred_masks": torch.randn(b, q, h, h, generator=g)}
    targets = []
    for i in range(b):
        n = 2 + i
        masks = (torch.rand(n, h * 4, h * 4, generator=g) > 0.5).float()
        targets.append({"labels": torch.randperm(k, generator=g)[:n], "masks": masks[: n - 1], "num_base": n - 1})
    matcher = HungarianMatcher(5.0, 20.0, 1.0)
    cpu = matcher(outputs, targets)
    dev = matcher({k_: v.to(DEVICE) for k_, v in outputs.items()},
                  [{k_: (v.to(DEVICE) if torch.is_tensor(v) else v) for k_, v in t.items()} for t in targets])
    for (r1, c1), (r2, c2) in zip(cpu, dev):
        assert torch.equal(r1, r2) and torch.equal(c1, c2)


def test_predict_on_the_device_gives_the_cpu_labels(data, tmp_path):
    """A model trained 4 steps, its heads sharpened so that images hold several classes: predict's
    labels on the device equal the CPU's on >= 99.9% of pixels."""
    from pipeline import predict as P
    from pipeline.engine.train import export_model, train
    ds, split, index = data
    p = tiny_params(train={"device": "cpu"})
    model, _ = train(p, ds, split, index, tmp_path / "ck.pt", progress=False)
    with torch.no_grad():
        for prm in [*model.mask_embed.parameters(), model.class_embed.weight]:
            prm.mul_(8)
    export_model(model, p, split, tmp_path / "model.pt", [])
    images = [P.read_image(ds / e["image"]) for e in index["test"]]
    labels = {d: P.predict_arrays(P.load_predictor(tmp_path / "model.pt", torch.device(d)), images)
              for d in ("cpu", DEVICE)}
    agree = np.mean([np.mean(a == b) for a, b in zip(labels["cpu"], labels[DEVICE])])
    assert max(len(np.unique(x)) for x in labels["cpu"]) >= 2
    assert agree >= 0.999, agree


RUN = r'''
import json, os, sys
import torch
torch.use_deterministic_algorithms(True, warn_only=True)
torch.backends.cudnn.benchmark = False
sys.path.insert(0, os.environ["SIMFORMER_ROOT"])
from pipeline.config import build_params
from pipeline.engine.train import train
args = json.loads(sys.argv[1])
p = build_params(args["raw"])
stop = args.get("stop")

def on_checkpoint(path, step):
    if stop is not None and step >= stop:
        raise KeyboardInterrupt("interrupted on purpose")

try:
    model, out = train(p, args["ds"], args["split"], args["index"], args["ckpt"], on_checkpoint=on_checkpoint,
                       progress=False)
except KeyboardInterrupt:
    print(json.dumps({"interrupted": True}))
    sys.exit(0)
state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
torch.save(state, args["weights"])
print(json.dumps({"interrupted": False, "resumed_from": out.resumed_from, "steps": out.steps,
                  "device": str(next(model.parameters()).device), "loss": out.history[-1]["loss"]}))
'''


def _run(tmp_path: Path, raw: dict, data, ckpt: Path, weights: Path, stop: int | None = None,
         hide_gpu: bool = False) -> dict:
    ds, split, index = data
    env = {**os.environ, "SIMFORMER_ROOT": str(ROOT), "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "OMP_NUM_THREADS": "1"}
    if hide_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    args = {"raw": raw, "ds": str(ds), "split": split, "index": index, "ckpt": str(ckpt), "weights": str(weights),
            "stop": stop}
    r = subprocess.run([sys.executable, "-c", RUN, json.dumps(args)], capture_output=True, text=True, env=env,
                       timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _max_diff(a: Path, b: Path) -> float:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) if x[k].numel() else 0.0 for k in x)


def test_interrupted_and_resumed_training_equals_the_uninterrupted_one(data, tmp_path):
    """2 x 20 steps (interrupted after the checkpoint of step 20, then resumed) against 40 steps in
    one go, twice: the resumed weights are no further from the uninterrupted ones than two
    uninterrupted runs are from each other (equal bits when those are)."""
    raw = tiny_raw(train={"iterations": 40, "checkpoint_interval": 20, "device": DEVICE})
    a1 = _run(tmp_path, raw, data, tmp_path / "a1.pt", tmp_path / "a1.w")
    a2 = _run(tmp_path, raw, data, tmp_path / "a2.pt", tmp_path / "a2.w")
    assert _run(tmp_path, raw, data, tmp_path / "b.pt", tmp_path / "b.w", stop=20) == {"interrupted": True}
    b = _run(tmp_path, raw, data, tmp_path / "b.pt", tmp_path / "b.w")
    assert (a1["resumed_from"], b["resumed_from"], b["steps"]) == (0, 20, 40)
    noise = _max_diff(tmp_path / "a1.w", tmp_path / "a2.w")
    resumed = _max_diff(tmp_path / "a1.w", tmp_path / "b.w")
    print(json.dumps({"uninterrupted_vs_uninterrupted": noise, "resumed_vs_uninterrupted": resumed,
                      "losses": [a1["loss"], a2["loss"], b["loss"]]}))
    assert resumed <= 10 * noise + (0.0 if noise == 0 else 1e-6), (resumed, noise)


def test_checkpoint_written_on_the_device_resumes_on_cpu_and_on_the_device(data, tmp_path):
    """train.device auto: the same params (so the same params hash) on a GPU process and on a process
    that sees no GPU; a checkpoint of step 2 written on the device resumes on both."""
    raw = tiny_raw(train={"iterations": 4, "checkpoint_interval": 2, "device": "auto"})
    assert _run(tmp_path, raw, data, tmp_path / "dev.pt", tmp_path / "x.w", stop=2) == {"interrupted": True}
    ck = torch.load(tmp_path / "dev.pt", map_location="cpu", weights_only=True)
    assert int(ck["step"]) == 2
    (tmp_path / "cpu.pt").write_bytes((tmp_path / "dev.pt").read_bytes())
    on_cpu = _run(tmp_path, raw, data, tmp_path / "cpu.pt", tmp_path / "cpu.w", hide_gpu=True)
    on_dev = _run(tmp_path, raw, data, tmp_path / "dev.pt", tmp_path / "dev.w")
    assert on_cpu["device"] == "cpu" and on_dev["device"].startswith(DEVICE)
    assert on_cpu["resumed_from"] == on_dev["resumed_from"] == 2 and on_cpu["steps"] == on_dev["steps"] == 4
    assert np.isfinite(on_cpu["loss"]) and np.isfinite(on_dev["loss"])


@pytest.mark.skipif(STAND_IN, reason="NCCL needs a GPU")
def test_nccl_initialises_for_one_process():
    import socket

    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        x = torch.ones(4, device="cuda")
        dist.all_reduce(x)
        assert x.tolist() == [1.0] * 4 and dist.get_backend() == "nccl"
    finally:
        dist.destroy_process_group()


def test_tiny_params_are_the_params_file_with_the_tiny_overrides():
    """The CUDA tests' params go through the same validation as params.yaml (a renamed key fails here)."""
    p = tiny_params()
    assert dataclasses.asdict(p.model)["hidden_dim"] == 32 and p.train.device == "auto"
