"""Report tables, figures and report.md / report.html from a fixed small metrics dict; class lists
that stay unambiguous when class names hold commas (ADE20K)."""
import math

import numpy as np
import pandas as pd
import pytest

from pipeline.report import (
    Inputs,
    metrics_table_markdown,
    per_class_table_markdown,
    plot_per_class_iou,
    plot_training_curve,
    sort_per_class,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

METRICS = {
    "mIoU": 55.55555, "mIoU_base": 50.0, "mIoU_novel": 66.66667, "hIoU": 57.142857,
    "pAcc": 70.0, "mAcc": 75.04, "fwIoU": 53.33333,
    "per_class": [
        {"id": 0, "name": "sky", "split": "base", "iou": 60.0, "acc": 75.0, "gt_pixels": 4000, "pred_pixels": 4000},
        {"id": 1, "name": "road", "split": "base", "iou": 40.0, "acc": 50.0, "gt_pixels": 4000, "pred_pixels": 3000},
        {"id": 2, "name": "cat", "split": "novel", "iou": 66.66667, "acc": 100.0, "gt_pixels": 2000,
         "pred_pixels": 3000},
        {"id": 3, "name": "dog", "split": "novel", "iou": None, "acc": None, "gt_pixels": 0, "pred_pixels": 0},
        {"id": 4, "name": "tree", "split": "base", "iou": 80.25, "acc": 90.0, "gt_pixels": 10, "pred_pixels": 10},
    ],
}


def _per_class_df():
    return pd.DataFrame(METRICS["per_class"])


def test_metrics_table_exact_numbers():
    md = metrics_table_markdown(METRICS)
    lines = md.strip().splitlines()
    assert lines[0] == "| mIoU | mIoU base | mIoU novel | hIoU | pAcc | mAcc | fwIoU |"
    assert lines[2] == "| 55.6 | 50.0 | 66.7 | 57.1 | 70.0 | 75.0 | 53.3 |"
    assert "n/a" in metrics_table_markdown({**METRICS, "hIoU": float("nan"), "mIoU_novel": None})


def test_per_class_sorted_by_split_then_iou():
    df = sort_per_class(_per_class_df())
    assert df["name"].tolist() == ["tree", "sky", "road", "cat", "dog"]
    md = per_class_table_markdown(df)
    assert "| 4 | tree | base | 80.2 | 90.0 | 10 | 10 |" in md     # 80.25 is exact in binary: half-to-even gives 80.2
    assert "| 3 | dog | novel | n/a | n/a | 0 | 0 |" in md
    assert "| 0 | sky | base | 60.0 | 75.0 | 4,000 | 4,000 |" in md


def _inputs(tmp_path, dataset="synthetic", **kw):
    curve = pd.DataFrame({"step": [10, 20, 30], "loss": [3.0, 2.0, 1.5], "loss_ce": [1.0, 0.8, 0.7],
                          "lr": 1e-4, "images_per_s": 9.0})
    run = {"commit": "0123abc", "experiment": "bushy-pugs", "date": "2026-01-02 03:04 UTC", "iterations": 600,
           "seed": 6, "changed": {"loss.pp_weight": (0.5, 0.3)}}
    return Inputs(title="SimFormer test", dataset=dataset, split=1, metrics=METRICS, per_class=_per_class_df(),
                  curve=curve, report_dir=tmp_path, figures_dir=tmp_path / "figures", **{"run": run, **kw})


def test_report_sections_and_single_title(tmp_path):
    parts = write_report(_inputs(tmp_path), tmp_path / "report.md", tmp_path / "report.html")
    assert [s.heading for s in parts] == ["Answer", "Metrics", "Split", "Per-class IoU", "Training curve", "Run"]
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# SimFormer test\n") and md.count("# SimFormer test") == 1
    assert "- commit: `0123abc`; DVC experiment: `bushy-pugs`" in md
    assert "- date: 2026-01-02 03:04 UTC" in md and "- main model: 600 iterations, seed 6" in md
    assert "- params changed from the committed params.yaml: `loss.pp_weight` 0.5 (committed 0.3)" in md
    assert "bit-identical" in md and "another CPU" in md
    assert "| 55.6 | 50.0 | 66.7 | 57.1 | 70.0 | 75.0 | 53.3 |" in md
    assert "- base (3): sky, road, tree" in md and "- novel (2): cat, dog" in md
    assert "![Training curve](figures/train_curve.png)" in md and "![Per-class IoU](figures/per_class_iou.png)" in md
    assert md.index("| 4 | tree |") < md.index("| 0 | sky |") < md.index("| 2 | cat |") < md.index("| 3 | dog |")
    assert "Reference bound" not in md and "Ablation" not in md
    page = (tmp_path / "report.html").read_text()
    assert page.count("<h1>") == 1 and page.count("SimFormer test</h1>") == 1
    assert page.count("data:image/png;base64,") == 2
    run = _inputs(tmp_path).run
    run["changed"] = {}
    md = "".join(s.markdown for s in write_report(_inputs(tmp_path, run=run), tmp_path / "r2.md"))
    assert "- params: as committed (params.yaml unchanged)" in md


@pytest.mark.parametrize("dataset,value", [("ade20k", "44.5"), ("coco_stuff_10k", "37.1")])
def test_reference_bound_only_for_real_datasets(tmp_path, dataset, value):
    write_report(_inputs(tmp_path, dataset), tmp_path / "report.md")
    md = (tmp_path / "report.md").read_text()
    assert "## Reference bound" in md
    sec = md[md.index("## Reference bound"):]
    assert f"**{value} mIoU**" in sec and "MaskFormer R50" in sec
    assert "not a reproduction" in sec and "upper bound" in sec
    assert "55.6 mIoU" in sec


def _check_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE


def test_training_curve_panels_plot_only_the_loss_terms():
    # the train stage's curve also logs lr, seconds and the similarity diagnostics; plotted on the
    # loss terms' axis, novel_pairs (~16000) flattened every loss to a line at 0
    from pipeline.report.figures import loss_terms
    curve = pd.DataFrame({"step": [10, 20], "loss": [5.0, 4.0], "loss_ce": [2.0, 1.5], "loss_dice": [0.7, 0.6],
                          "lr": [1e-3, 9e-4], "images_per_s": [20.0, 21.0], "seconds": [1.0, 2.0],
                          "grad_ClsLoss": [0.6, 0.5], "auc_simnet": [0.7, 0.8], "novel_pairs": [16384, 8192],
                          "loss_note": ["a", "b"]})
    assert loss_terms(curve) == ["loss_ce", "loss_dice"]


def test_figures_written(tmp_path):
    steps = np.arange(0, 200, 10)
    rng = np.random.default_rng(0)
    curve = pd.DataFrame({"step": steps, "loss": 5 * np.exp(-steps / 80) + rng.random(len(steps)),
                          "loss_cls": np.linspace(2, 1, len(steps)), "loss_mask": np.linspace(3, 1, len(steps)),
                          "loss_sim": np.linspace(0.7, 0.3, len(steps)),
                          "lr": np.linspace(3e-4, 0, len(steps)), "images_per_s": 12.0})
    csv = tmp_path / "train_curve.csv"
    curve.to_csv(csv, index=False)
    out = tmp_path / "sub" / "train_curve.png"
    plot_training_curve(csv, out, smoothing=5)
    _check_png(out)
    out2 = tmp_path / "curve_df.png"
    plot_training_curve(curve, out2, smoothing=1)
    _check_png(out2)
    empty = tmp_path / "empty.png"
    plot_training_curve(pd.DataFrame(columns=["step", "loss", "lr", "images_per_s"]), empty, smoothing=3)
    _check_png(empty)
    bars = tmp_path / "per_class_iou.png"
    plot_per_class_iou(_per_class_df(), bars)
    _check_png(bars)
    # no temporary files left behind by the atomic writes
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]
    assert not math.isnan(curve["loss"].iloc[0])


def test_report_class_lists_stay_unambiguous():
    from pipeline.report.tables import format_class_list, split_markdown
    ade = ["wall", "building, edifice", "sky", "road, route"]
    assert format_class_list(ade) == "wall; building, edifice; sky; road, route"
    assert format_class_list(["sky", "road", "tree"]) == "sky, road, tree"     # no comma: as before
    assert format_class_list(["a, b", "c; d"]) == '"a, b", "c; d"'
    assert format_class_list([]) == "none"
    per_class = [{"id": i, "name": n, "split": "novel" if i == 1 else "base", "iou": 50.0, "acc": 60.0,
                  "gt_pixels": 10, "pred_pixels": 10} for i, n in enumerate(ade)]
    md = split_markdown(per_class)
    assert "- base (3): wall; sky; road, route" in md
    assert "- novel (1): building, edifice" in md
