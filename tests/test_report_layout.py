"""The report opens with the answer (four lines: the headline, full SimFormer's mean over the grid's
seeds with its interval; the main model against its target; the grid's order by novel mIoU;
full − +complementary with its interval), the training times sit under
*Run* (last), and every figure panel has a title (not cut off), a y label and a legend."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from pipeline.report import Grid, Inputs, write_report
from pipeline.report import ablation as ab

SEEDS = (6, 7, 8)
NOVEL = {"baseline": (9.0, 10.0, 8.0), "+complementary": (50.0, 49.0, 51.0), "full": (57.0, 58.0, 57.5),
         "oracle": (73.0, 74.0, 74.5)}
METRICS = {"mIoU": 75.1, "mIoU_base": 78.2, "mIoU_novel": 65.9, "hIoU": 71.5, "pAcc": 89.3, "mAcc": 85.8,
           "fwIoU": 81.8}
BASELINES = {"majority": {"mIoU": 0.4, "pAcc": 8.6}, "nearest_colour": {"mIoU": 36.8, "pAcc": 60.7},
             "fit": {"train_images": 320, "test_images": 80}}


def _per_class() -> pd.DataFrame:
    return pd.DataFrame([
        {"id": 0, "name": "sky", "split": "base", "iou": 60.0, "acc": 70.0, "gt_pixels": 100, "pred_pixels": 90},
        {"id": 1, "name": "road", "split": "base", "iou": 50.0, "acc": 60.0, "gt_pixels": 100, "pred_pixels": 90},
        {"id": 2, "name": "cat", "split": "novel", "iou": 30.0, "acc": 40.0, "gt_pixels": 50, "pred_pixels": 40},
        {"id": 3, "name": "dog", "split": "novel", "iou": float("nan"), "acc": float("nan"), "gt_pixels": 0,
         "pred_pixels": 0}])


def _curve(steps=(10, 20, 30), comp=True, seconds0=0.0) -> pd.DataFrame:
    rows = []
    for i, s in enumerate(steps):
        rows.append({"step": s, "loss_ce": 1.0 / (i + 1), "loss_mask": 0.2, "loss_dice": 0.5,
                     "loss_comp": 0.3 if comp else float("nan"), "loss_sim": 0.4, "loss_dist": 0.1,
                     "loss": 3.0 / (i + 1), "lr": 1e-3, "images_per_s": 9.0, "seconds": seconds0 + 2.0 * s})
    return pd.DataFrame(rows)


def _cells(root):
    for v, novel in NOVEL.items():
        for seed, n in zip(SEEDS, novel):
            d = root / f"{v}-{seed}"
            d.mkdir(parents=True)
            (d / "cell.json").write_text(json.dumps({"variant": v, "seed": seed, "params_hash": f"{v}{seed}",
                                                     "shared_with_main": v == "full" and seed == 6,
                                                     "iterations": 30, "torch_threads": 1,
                                                     "dataset": "synthetic", "split": 1}))
            (d / "metrics.json").write_text(json.dumps({"mIoU": 60.0 + n / 10, "mIoU_base": 75.0, "mIoU_novel": n,
                                                        "hIoU": n, "pAcc": 85.0, "mAcc": 80.0, "fwIoU": 79.0}))
            _per_class().to_csv(d / "per_class_iou.csv", index=False)
            _curve(comp=v != "baseline").to_csv(d / "curve.csv", index=False)
    return root


def _inputs(tmp_path, grid=True) -> Inputs:
    g = None
    if grid:
        cells_dir = _cells(tmp_path / "cells")
        variants = list(NOVEL)
        cells = ab.grid_cells(cells_dir, [(v, s) for v in variants for s in SEEDS])
        g = Grid(ab.ablation_table(cells, variants), cells_dir, variants, list(SEEDS), 30, cells)
    run = {"commit": "0123abc", "experiment": "workspace", "date": "2026-01-02 03:04 UTC", "iterations": 30,
           "seed": 6, "changed": {}, "main_run": "full-seed6 (main)"}
    return Inputs(title="SimFormer", dataset="synthetic", split=1, metrics=METRICS, per_class=_per_class(),
                  curve=_curve(), report_dir=tmp_path, figures_dir=tmp_path / "figures", run=run, grid=g,
                  baselines=BASELINES)


def test_the_report_opens_with_the_answer(tmp_path):
    parts = write_report(_inputs(tmp_path), tmp_path / "report.md", tmp_path / "report.html",
                         tmp_path / "ablation.md")
    headings = [s.heading for s in parts]
    assert headings[0] == "Answer" and headings[-1] == "Run"
    md = (tmp_path / "report.md").read_text()
    body = md.split("\n## ", 2)[1]                      # the first section, right under the title
    assert md.startswith("# SimFormer\n\n## Answer\n")
    lines = [ln for ln in body.splitlines() if ln.startswith("- ")]
    assert len(lines) == 4, body
    # full over seeds 6, 7, 8: novel 57, 58, 57.5 -> 57.5 ± 0.5, t(2) interval; mIoU 60 + novel / 10
    x = np.array([57.0, 58.0, 57.5])
    h = 4.302652729911275 * x.std(ddof=1) / np.sqrt(3)
    assert lines.pop(0) == (f"- **Headline: full SimFormer over 3 seeds** (6, 7, 8; 30 iterations each), mean and 95% t "
                            f"interval: novel mIoU **57.5** [{57.5 - h:.1f}, {57.5 + h:.1f}], mIoU **65.8** "
                            f"[{65.75 - h / 10:.1f}, {65.75 + h / 10:.1f}], hIoU **57.5** [{57.5 - h:.1f}, "
                            f"{57.5 + h:.1f}]. One seed's figure moves with the CPU and the thread count; quote the "
                            "interval.")
    assert lines[0].startswith("- **Main model** (full-seed6 (main), 30 iterations): novel mIoU 65.9, mIoU 75.1, "
                               "pAcc 89.3: meets its target (pAcc ≥ 80 and mIoU ≥ 73.6")
    assert lines[1] == ("- **Grid by novel mIoU** (mean over seeds 6, 7, 8): oracle 73.8 > full 57.5 > "
                        "+complementary 50.0 > baseline 9.0.")
    # full − +complementary per seed: 7, 9, 6.5 -> mean 7.5, t interval with 2 degrees of freedom
    d = np.array([7.0, 9.0, 6.5])
    half = 4.302652729911275 * d.std(ddof=1) / np.sqrt(3)
    assert lines[2] == (f"- **full − +complementary**, novel mIoU paired over 3 seeds: 7.5 (95% CI "
                        f"[{d.mean() - half:.1f}, {d.mean() + half:.1f}]); resolved: a > b.")
    run = md[md.index("\n## Run\n"):]
    assert "| run | steps | torch threads | training time (s) |" in run
    assert "| main model | 30 | (train stage) | 60 |" in run
    paired = md[md.index("\n## Paired differences\n"):md.index("\n## ", md.index("\n## Paired differences\n") + 5)]
    assert "training time" not in paired
    html = (tmp_path / "report.html").read_text()
    assert html.index("Answer</h2>") < html.index("Metrics</h2>") < html.index("Run</h2>")
    assert html.count("<h2") == md.count("\n## ")


def test_answer_without_a_grid_or_baselines(tmp_path):
    r = _inputs(tmp_path, grid=False)
    r.baselines = None
    parts = write_report(r, tmp_path / "report.md")
    text = parts[0].markdown
    assert parts[0].heading == "Answer" and text.count("\n- ") + text.startswith("- ") == 4
    assert "no target to compare with" in text and "Grid**: none in this run" in text
    assert text.startswith("- **Headline**: no `full` cells over two or more seeds in this run's grid, so no "
                           "interval: the main model's single seed below is a quick look")
    assert "The main model trained 30 steps in 60 s." in parts[-1].markdown


def test_a_missed_target_is_said(tmp_path):
    r = _inputs(tmp_path, grid=False)
    r.metrics = {**METRICS, "pAcc": 70.0}
    text = write_report(r, tmp_path / "report.md")[0].markdown
    assert "**misses** its target" in text


@pytest.fixture
def saved_figures(monkeypatch):
    """Every Figure saved while the test runs (report figures are written through savefig)."""
    figs = []
    real = Figure.savefig

    def spy(self, *a, **k):
        figs.append(self)
        return real(self, *a, **k)
    monkeypatch.setattr(Figure, "savefig", spy)
    return figs


def _check_panels(fig: Figure, what: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)           # pyplot figures were closed after saving
    canvas.draw()
    renderer = canvas.get_renderer()
    box = fig.bbox
    colorbars = {ax for ax in fig.axes if ax.get_label() == "<colorbar>"}
    legends = bool(fig.legends) or bool(colorbars)
    for ax in fig.axes:
        if ax in colorbars or not ax.axison and not ax.images:
            continue
        title = ax.get_title() or ax.get_title("left")
        assert title, f"{what}: a panel without a title"
        t = ax.title.get_window_extent(renderer)
        assert t.x0 >= box.x0 - 1 and t.x1 <= box.x1 + 1 and t.y1 <= box.y1 + 1, \
            f"{what}: title {title!r} is cut off ({t} outside {box})"
        if ax.images and not ax.get_ylabel():       # image panels (qualitative): a title and the figure's legend
            assert legends, f"{what}: image panels without a legend"
            continue
        assert ax.get_ylabel(), f"{what}: panel {title!r} has no y label"
        assert ax.get_legend() is not None or colorbars, f"{what}: panel {title!r} has no legend"


def test_every_figure_panel_has_title_y_label_and_legend(tmp_path, saved_figures):
    from pipeline.report import evidence as ev
    from pipeline.report.figures import confusion_figure, plot_per_class_iou, plot_training_curve
    cells_dir = _cells(tmp_path / "cells")
    variants = list(NOVEL)
    plot_training_curve(_curve(), tmp_path / "curve.png")
    plot_per_class_iou(_per_class(), tmp_path / "pc.png")
    ab.plot_novel_class_iou(ab.novel_class_iou(cells_dir, variants), tmp_path / "novel.png")
    ab.plot_variant_curves(cells_dir, variants, tmp_path / "variants.png")
    sweep = pd.DataFrame({"pp_weight": [0.0, 0.3, 1.0], "variant": ["pp0", "full", "pp1"], "n": 3,
                          "novel_mean": [50.0, 57.0, 55.0], "novel_std": [1.0, 1.0, 1.0],
                          "base_mean": [75.0, 75.0, 74.0], "base_std": [0.5, 0.5, 0.5]})
    ev.plot_sweep(sweep, tmp_path / "sweep.png")
    diag = pd.DataFrame({"variant": "full", "seed": 6, "step": [10, 20], "auc_simnet": [0.6, 0.7],
                         "auc_student": [0.55, 0.65]})
    ev.plot_diagnostics(diag, tmp_path / "diag.png")
    names = ["sky", "road", "cat", "dog"]
    confusion_figure(np.array([[5, 1, 0, 0], [0, 7, 1, 0], [2, 0, 3, 1], [0, 0, 1, 4]]), names, [2, 3]).savefig(
        tmp_path / "conf.png")
    what = ["training curve", "per-class IoU", "novel-class IoU", "variant curves", "sweep", "diagnostics",
            "confusion matrix"]
    assert len(saved_figures) == len(what)
    for fig, w in zip(saved_figures, what):
        _check_panels(fig, w)
    curve_axes = saved_figures[0].axes
    assert [ax.get_ylabel() for ax in curve_axes] == ["loss", "unweighted loss"]
    variant_axes = saved_figures[3].axes
    assert len(variant_axes) == 5 and all(ax.get_legend() is not None for ax in variant_axes)   # loss_comp: not in baseline


def test_qualitative_figure_panels(tmp_path, saved_figures):
    import torch

    from pipeline.config import build_params
    from pipeline.model import build_model
    from pipeline.report.qualitative import qualitative_figure
    from tests.conftest import file_params
    p = build_params(file_params({"model": {"pretrained": "none", "hidden_dim": 32, "num_queries": 8, "nheads": 2,
                                            "dim_feedforward": 64, "conv_dim": 32, "mask_dim": 32, "gn_groups": 8}}))
    torch.manual_seed(0)
    model = build_model(p.model, 4)
    rng = np.random.default_rng(0)
    images = [("a", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.integers(0, 4, (64, 64)))]
    qualitative_figure(model, images, ["sky", "road", "cat", "dog"], None, [2, 3], tmp_path / "q.png", top_k=2)
    (fig,) = saved_figures
    _check_panels(fig, "qualitative")


def test_the_headline_over_several_splits_names_splits_and_seeds(tmp_path):
    """A grid over splits 1, 2 x seeds 6, 7: the headline pools the 4 cells of (split, seed) and says so,
    instead of listing each seed once per split."""
    from pipeline.report.build import headline_line
    r = _inputs(tmp_path)
    novel = {(1, 6): 40.0, (1, 7): 44.0, (2, 6): 50.0, (2, 7): 46.0}
    r.grid.cells = pd.DataFrame([{"variant": "full", "split": k, "seed": s, "mIoU_novel": v,
                                  "mIoU": 60.0 + v / 10, "hIoU": v} for (k, s), v in novel.items()])
    x = np.array(list(novel.values()))
    h = 3.182446305284263 * x.std(ddof=1) / 2.0                    # t(3) at 97.5%, sqrt(4) = 2
    assert headline_line(r) == (
        "- **Headline: full SimFormer over 4 cells** (splits 1, 2 × seeds 6, 7, pooled; 30 iterations each), "
        f"mean and 95% t interval: novel mIoU **45.0** [{45 - h:.1f}, {45 + h:.1f}], mIoU **64.5** "
        f"[{64.5 - h / 10:.1f}, {64.5 + h / 10:.1f}], hIoU **45.0** "
        f"[{45 - h:.1f}, {45 + h:.1f}]. One seed's figure moves with the CPU and the thread count; quote the "
        "interval.")
