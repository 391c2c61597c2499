"""The benchmark command and the training fast-path switches.

No timing is asserted here: speed is measured by ``python -m tools.benchmark``, never by a
timed test. The CUDA-only switches are checked on their CPU side (validation, resolution per
device, channels_last weights, the bf16 + channels_last + fused step run with CPU autocast).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from pipeline.config import ConfigError, build_params, describe
from pipeline.engine import train as train_mod
from pipeline.engine.benchmark import PHASES, VARIANTS, make_dataset
from pipeline.engine.train import FastPath, build_criterion, prepare_model, train
from pipeline.losses.matcher import PerImageMatcher
from pipeline.model import build_model
from tests.helpers import file_params

TINY = {
    "data": {"crop_size": 64, "synthetic": {"num_train": 16, "num_test": 4, "image_size": 64}},
    "model": {"hidden_dim": 32, "num_queries": 8, "nheads": 2, "dec_layers": 2, "dim_feedforward": 64,
              "conv_dim": 32, "mask_dim": 32, "gn_groups": 8, "pretrained": "none"},
    "loss": {"sim_points": 10, "sim_base_points": 8, "pp_points": 10},
    "train": {"batch_size": 4, "threads": 1, "iterations": 2, "log_interval": 1, "checkpoint_interval": 2,
              "freeze": "none"},
}
SWITCHES = ("channels_last", "tf32", "fused_adamw", "compile")


@pytest.mark.parametrize("key", SWITCHES)
def test_fast_path_switches_validate(key):
    with pytest.raises(ConfigError, match=rf"params key 'train\.{key}': expected true or false, got 'yes'"):
        build_params(file_params({"train": {key: "yes"}}))
    with pytest.raises(ConfigError, match=rf"'train\.{key}': expected true or false"):
        build_params(file_params({"train": {key: 1}}))
    assert getattr(build_params(file_params({"train": {key: False}})).train, key) is False
    assert f"  {key}: " in describe(file_params())


def test_fast_path_resolution():
    on = {"amp": True, "channels_last": True, "tf32": True, "fused_adamw": True, "compile": False}
    t = build_params(file_params({"train": on})).train
    cpu = FastPath.resolve(t, torch.device("cpu"))
    assert cpu == FastPath()                                    # CUDA-only switches are no-ops on the CPU
    assert FastPath.not_applied(t, torch.device("cpu")) == ["amp", "channels_last", "tf32", "fused_adamw"]
    cuda = FastPath.resolve(t, torch.device("cuda"))           # resolution only: no CUDA needed
    assert cuda == FastPath(amp=True, channels_last=True, tf32=True, fused_adamw=True, compile=False)
    assert FastPath.not_applied(t, torch.device("cuda")) == []
    t2 = build_params(file_params({"train": {"compile": True, "channels_last": False}})).train
    assert FastPath.resolve(t2, torch.device("cpu")).compile is True
    assert FastPath.resolve(t2, torch.device("cuda")).channels_last is False


def test_channels_last_yields_channels_last_parameters():
    p = build_params(file_params(TINY))
    model = build_model(p.model, 24)
    prepare_model(model, FastPath())
    convs = [w for w in model.parameters() if w.dim() == 4]
    assert convs and not all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    fwd = prepare_model(model, FastPath(channels_last=True))
    assert fwd is model
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    p = build_params(file_params(TINY))
    return p, *make_dataset(tmp_path_factory.mktemp("bench_data"), p, 16, 4, 64)


def test_train_runs_the_cuda_fast_path_on_cpu(tiny_data, tmp_path, monkeypatch):
    """train() with bf16 autocast + channels_last + fused AdamW forced on (CPU autocast stands in for CUDA)."""
    p, ds, split, index = tiny_data
    forced = FastPath(amp=True, channels_last=True, tf32=True, fused_adamw=True)
    monkeypatch.setattr(train_mod.FastPath, "resolve", classmethod(lambda cls, t, d: forced))
    model, out = train(p, ds, split, index, tmp_path / "ck.pt", progress=False)
    assert out.steps == 2 and len(out.history) == 2
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in out.history)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in model.parameters() if w.dim() == 4)
    assert (tmp_path / "ck.pt").stat().st_size > 0


def test_per_image_matching_equals_batched(tiny_data):
    p, ds, split, index = tiny_data
    from pipeline.data.targets import weak_shot_targets
    from pipeline.engine.train import build_train_loader
    torch.manual_seed(0)
    model = build_model(p.model, split["num_classes"]).eval()
    crit = build_criterion(p, split["num_classes"], split["base"], split["novel"])
    batch = next(iter(build_train_loader(p, ds, index, 0, 1, torch.device("cpu"))))
    with torch.no_grad():
        out = model(batch["image"].float())
    targets = weak_shot_targets(batch["sem_seg"], batch["valid"], torch.tensor(split["base"]),
                                torch.tensor(split["novel"]))
    batched, per_image = crit.matcher(out, targets), PerImageMatcher(crit.matcher)(out, targets)
    assert len(batched) == len(per_image) == 4
    for (r1, c1), (r2, c2) in zip(batched, per_image):
        assert torch.equal(r1, r2) and torch.equal(c1, c2)


def test_benchmark_help(capsys):
    from tools.benchmark import main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--steps", "--warmup", "--configs", "--variants", "--paper-batch", "--paper-crop", "--out", "--md"):
        assert flag in text
    assert "fp32_per_image" in text and "989 TFLOP/s" in text


def test_benchmark_tiny_writes_json_and_markdown(tmp_path):
    from tools.benchmark import main
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(file_params(TINY)))
    out, md = tmp_path / "reports" / "bench.json", tmp_path / "reports" / "bench.md"
    main(["--params", str(params), "--out", str(out), "--md", str(md), "--steps", "2", "--warmup", "1",
          "--configs", "default,paper", "--variant-configs", "default",
          "--variants", "fp32_per_image,bf16+channels_last+batched,+compile",
          "--paper-crop", "64", "--paper-batch", "2", "--paper-steps", "1", "--paper-warmup", "0",
          "--eval-images", "2", "--loader-batches", "2", "--device", "cpu", "--no-progress",
          "--workdir", str(tmp_path)])
    r = json.loads(out.read_text())
    env = r["environment"]
    for k in ("device_name", "torch", "torchvision", "python", "torch_threads", "git"):
        assert env[k] not in (None, "")
    assert env["device"] == "cpu" and r["device_peak_flops"] is None
    assert r["peak_flops_table"]["H100"]["flops_per_s"] == 989e12
    assert r["settings"]["steps"] == 2 and r["settings"]["train"]["channels_last"] is True
    assert set(r["configs"]) == {"default", "paper"}
    for name, c in r["configs"].items():
        t = c["train"]
        assert t["images_per_s"] > 0 and t["step_s"] > 0 and t["memory"]["peak_mb"] > 0
        assert c["eval"]["images_per_s"] > 0 and c["loader"]["images_per_s"] > 0
        assert c["loader"]["loader_over_train"] > 0
        assert c["flops"]["forward_per_image"] > 0 and c["flops"]["achieved_gflops_per_s"] > 0
        assert c["flops"]["mfu"] is None                      # CPU: achieved GFLOP/s only
        b = c["breakdown"]
        assert set(b["seconds_per_step"]) == set(PHASES) and b["step_s"] > 0
        assert all(v >= 0 for v in b["seconds_per_step"].values())
        assert b["seconds_per_step"]["forward"] > 0 and b["seconds_per_step"]["backward"] > 0
        assert abs(sum(b["share"].values()) - 1) < 1e-6
        assert 0 < b["match_loss_share"] < 1 and 0 < b["matching_share"] <= b["match_loss_share"]
        assert b["target_match_loss_share_max"] == 0.2 and isinstance(b["meets_target"], bool)
    paper = r["configs"]["paper"]
    assert paper["model"]["backbone"] == "resnet50" and paper["model"]["num_queries"] == 100
    assert paper["model"]["dec_layers"] == 6 and paper["model"]["hidden_dim"] == 256
    assert paper["budget"]["reduced"] and paper["train"]["steps"] == 1 and paper["variants"] == {}
    assert r["configs"]["paper"]["flops"]["forward_per_image"] > r["configs"]["default"]["flops"]["forward_per_image"]
    v = r["configs"]["default"]["variants"]
    assert list(v) == ["fp32_per_image", "bf16+channels_last+batched", "+compile"]
    assert v["fp32_per_image"]["per_image_matching"] is True and v["fp32_per_image"]["images_per_s"] > 0
    assert v["fp32_per_image"]["speedup_vs_fp32_per_image"] == pytest.approx(1.0)
    assert v["bf16+channels_last+batched"]["not_applied"] == ["amp", "channels_last", "tf32", "fused_adamw"]
    assert v["bf16+channels_last+batched"]["images_per_s"] > 0
    assert v["+compile"]["skipped"] and "CPU" in v["+compile"]["skipped"]
    assert set(VARIANTS) >= set(v)
    text = md.read_text()
    d = r["configs"]["default"]
    for figure in (f"{d['train']['images_per_s']:.2f}", f"{d['eval']['images_per_s']:.2f}",
                   f"{d['breakdown']['match_loss_share'] * 100:.1f}%", "fp32_per_image", "skipped", "(CUDA only)"):
        assert figure in text
    assert "| paper | 64 | 2 | 1 |" in text
    assert not list(out.parent.glob(".*.tmp*"))               # atomic writes leave no temporaries


def test_benchmark_and_engine_import_without_dvc_and_mlflow():
    """The GPU machine has neither DVC nor MLflow: the engine and the benchmark tool must not need them."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, importlib, pkgutil; sys.modules.update({m: None for m in ('mlflow', 'dvc')}); "
            "import pipeline.engine as e; "
            "[importlib.import_module('pipeline.engine.' + m.name) for m in pkgutil.iter_modules(e.__path__)]; "
            "import tools.benchmark; print('ok')")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
