"""The GPU check command (tools.gpu_check), dry-run on the CPU at toy sizes: the same command the
GPU machine runs, so that device time goes to measuring, not to fixing the tool."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from tests.helpers import ROOT


def _run(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "tools.gpu_check", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_smoke_run_on_cpu_writes_every_file(tmp_path):
    out = tmp_path / "gpu"
    r = _run("--out", out, "--device", "cpu", "--smoke", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["benchmark.json", "benchmark.md", "cuda_tests.txt", "grid.json",
                                                      "paper_training.json", "results.json", "summary.md"]
    res = json.loads((out / "results.json").read_text())
    assert res["smoke"] is True and all(s["ok"] for s in res["steps"].values()), res["steps"]
    assert set(res["steps"]) == {"environment", "matmul", "cuda tests", "benchmark", "paper training", "grid"}
    assert res["environment"]["device"] == "cpu" and res["matmul"]["tflops_per_s"] > 0
    assert res["cuda_tests"]["stand_in_cpu"] and "passed" in res["cuda_tests"]["summary"]
    assert "-m cuda" in (out / "cuda_tests.txt").read_text()
    t = json.loads((out / "paper_training.json").read_text())
    assert t["steps"] == 2 and t["finite"] and len(t["curve"]) == 2
    assert t["hours_for_paper_schedule"]["ade20k"] == 160_000 * t["seconds_per_iteration"] / 3600
    assert t["hours_for_paper_schedule"]["coco_stuff_10k"] == 60_000 * t["seconds_per_iteration"] / 3600
    bench = json.loads((out / "benchmark.json").read_text())
    assert list(bench["shapes"]) == ["64x2"]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check (smoke") and "Paper training: 2 steps" in summary
    assert "| 64x2 |" in (out / "benchmark.md").read_text()
    g = json.loads((out / "grid.json").read_text())
    assert sorted(g["by_procs"]) == ["1", "2"] and g["steps"] == 3 and g["cell_steps"] == 3000
    for n, rec in g["by_procs"].items():
        assert len(rec["seconds_per_step"]) == int(n) and all(s > 0 for s in rec["seconds_per_step"])
        assert rec["aggregate_steps_per_s"] == sum(1 / s for s in rec["seconds_per_step"])
        assert rec["cells_per_hour"] == rec["aggregate_steps_per_s"] * 3600 / 3000
    assert g["by_procs"]["1"]["speedup_vs_1"] == 1.0 and g["best"] in (1, 2)
    assert "Grid on one device (3 steps per cell" in summary


def test_paper_params_are_the_preset_on_synthetic_data():
    from tools.gpu_check import paper_params
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    preset = yaml.safe_load((ROOT / "presets/paper-coco_stuff_10k.yaml").read_text())
    p = paper_params(base, preset, crop=640, batch=8, steps=300, device="cuda", workers=8)
    assert (p.model.backbone, p.model.num_queries, p.model.dec_layers, p.model.hidden_dim) == ("resnet50", 100, 6, 256)
    assert (p.data.dataset, p.data.crop_size, p.train.batch_size, p.train.iterations) == ("synthetic", 640, 8, 300)
    assert p.model.pretrained == "none" and p.loss.pp_weight == preset["loss"]["pp_weight"]


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    r = _run("--out", tmp_path / "x", "--device", "cpu", "--skip", "benchmrk", timeout=120)
    assert r.returncode == 1 and "--skip: unknown step 'benchmrk'" in r.stderr
    r = _run("--out", tmp_path / "x", "--device", "cpu", "--grid-procs", "2,x", timeout=120)
    assert r.returncode == 1 and "--grid-procs: expected a comma list of positive integers, got '2,x'" in r.stderr
    r = _run("--out", tmp_path / "x", "--device", "cpu", "--paper-preset", tmp_path / "none.yaml", timeout=120)
    assert r.returncode == 1 and "none.yaml" in r.stderr and not (tmp_path / "x").exists()
