"""dvc.yaml's plots: every loss term of the training curve against step, per-class IoU as bars and
the confusion matrix as a heatmap (a template of .dvc/plots, since DVC's own confusion templates
count rows and the CSV holds counts). `dvc plots diff` of two revisions renders each of them with
both revisions' data. The CSVs are written by the functions the stages write them with."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT

OUR_PLOTS = ("train_loss_terms", "train_loss_total", "per_class_iou", "confusion_matrix")
NAMES = ["sky", "road", "tree", "cat"]


def _env() -> dict:
    import os
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update({"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@localhost"})
    env.pop("DVC_ROOT", None)
    return env


def _write_outputs(project: Path, seed: int, with_comp: bool) -> None:
    """The evaluate and train stages' CSVs (and stand-in report PNGs) for one revision."""
    import cv2

    from pipeline.engine.metrics import compute_metrics, confusion_pairs
    from pipeline.engine.train import curve_table
    from pipeline.io import write_csv, write_eval_outputs
    rng = np.random.default_rng(seed)
    conf = rng.integers(0, 50, (4, 4)) + np.diag(rng.integers(100, 400, 4))
    conf[3, 0] = 0                                           # a pair that never occurs: no row
    metrics = compute_metrics(conf, [0, 1, 2], [3], NAMES)
    per_class = metrics.pop("per_class")
    write_eval_outputs(project / "reports/metrics.json", project / "reports/per_class_iou.csv",
                       {"dataset": "synthetic", "split": 1, **metrics}, per_class)
    write_csv(project / "reports/confusion.csv", confusion_pairs(conf, NAMES))
    terms = ["loss_ce", "loss_mask", "loss_dice", "loss_sim", "loss_dist"] + (["loss_comp"] if with_comp else [])
    history = [{"step": s, **{t: float(rng.random()) for t in terms}, "loss": 2.0 / s, "lr": 1e-3, "seconds": s * 0.5}
               for s in range(1, 6)]
    write_csv(project / "reports/train_curve.csv", curve_table(history))
    write_csv(project / "reports/pretrain_curve.csv", [{"step": s, "pixel": 1.0 / s, "image": 0.5, "loss": 1.5 / s}
                                                       for s in range(1, 4)])
    (project / "reports/figures").mkdir(parents=True, exist_ok=True)
    for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]:
        if isinstance(entry, str) and entry.endswith(".png"):
            cv2.imwrite(str(project / entry), np.full((4, 4, 3), seed * 40, np.uint8))


def test_curve_csv_has_every_loss_term_column(tmp_path):
    """A term the params turn off is a blank column: the plot finds it in every revision."""
    import pandas as pd

    from pipeline.engine.train import curve_table
    from pipeline.io import write_csv
    from pipeline.losses.criterion import TERMS
    write_csv(tmp_path / "c.csv", curve_table([{"step": 1, "loss_ce": 1.0, "loss": 1.0, "seconds": 0.1}]))
    df = pd.read_csv(tmp_path / "c.csv")
    assert list(df.columns[:len(TERMS) + 2]) == ["step", *TERMS, "loss"]
    assert df["loss_comp"].isna().all() and df["loss_ce"].tolist() == [1.0]
    plots = {k: v for e in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"] if isinstance(e, dict)
             for k, v in e.items()}
    assert plots["train_loss_terms"]["y"]["reports/train_curve.csv"] == list(TERMS)


def test_confusion_pairs_hold_counts():
    from pipeline.engine.metrics import confusion_pairs
    rows = confusion_pairs(np.array([[5, 0], [2, 7]]), ["a", "b"])
    assert rows == [{"actual": "a", "predicted": "a", "count": 5, "actual_id": 0, "predicted_id": 0},
                    {"actual": "b", "predicted": "a", "count": 2, "actual_id": 1, "predicted_id": 0},
                    {"actual": "b", "predicted": "b", "count": 7, "actual_id": 1, "predicted_id": 1}]


def test_plots_diff_of_two_revisions_renders_every_plot(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is required for dvc")
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    shutil.copytree(ROOT / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    env = _env()
    git = ["git", "-c", "init.defaultBranch=main"]
    subprocess.run(git + ["init", "-q"], cwd=project, check=True, env=env)
    for seed, comp in ((1, True), (2, False)):          # the second revision turned loss_comp off
        _write_outputs(project, seed, comp)
        subprocess.run(["git", "add", "-A"], cwd=project, check=True, env=env)
        subprocess.run(["git", "commit", "-qm", f"rev {seed}"], cwd=project, check=True, env=env)
    r = subprocess.run([str(Path(sys.executable).parent / "dvc"), "plots", "diff", "HEAD~1", "HEAD", "--json"],
                       cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    shown = json.loads(r.stdout)
    assert not shown.get("errors"), shown.get("errors")
    data = shown.get("data", shown)
    for plot in OUR_PLOTS:
        (entry,) = data[plot]
        assert entry["type"] == "vega"
        assert set(entry["revisions"]) == {"HEAD~1", "HEAD"}, (plot, entry["revisions"])
        values = entry["content"]["data"]["values"]
        assert {v["rev"] for v in values} == {"HEAD~1", "HEAD"}, plot
    spec = data["confusion_matrix"][0]["content"]
    assert spec["spec"]["encoding"]["x"]["field"] == "predicted" and spec["spec"]["encoding"]["y"]["field"] == "actual"
    assert spec["spec"]["mark"] == "rect"
    counts = {(v["rev"], v["actual"], v["predicted"]): int(v["count"]) for v in spec["data"]["values"]}
    assert ("HEAD", "cat", "sky") not in counts and counts[("HEAD", "cat", "cat")] > 0
    bars = data["per_class_iou"][0]["content"]
    assert bars["encoding"]["x"]["field"] == "iou" and bars["encoding"]["y"]["field"] == "name"
    assert {v["name"] for v in bars["data"]["values"]} == set(NAMES)
    terms = data["train_loss_terms"][0]["content"]
    fields = {v.get("field") for v in terms["data"]["values"]}
    assert {"loss_ce", "loss_comp", "loss_dist"} <= fields               # one line per term and revision
    for png in ("reports/figures/train_curve.png", "reports/figures/qualitative.png"):
        assert {e["revisions"][0] for e in data[png]} == {"HEAD~1", "HEAD"}
