"""Report tables, figures and report.md from a fixed small metrics dict."""
import math

import numpy as np
import pandas as pd
import pytest

from pipeline.report import (
    metrics_table_markdown,
    per_class_table_markdown,
    plot_per_class_iou,
    plot_training_curve,
    render_report,
    sort_per_class,
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


def test_render_report_sections(tmp_path):
    figs = {"Training curve": "train_curve.png", "Per-class IoU": "per_class_iou.png"}
    md = render_report("SimFormer test", METRICS, _per_class_df(), figs, {"dataset": "synthetic", "split": 1,
                                                                           "params_hash": "abc123"})
    assert md.startswith("# SimFormer test\n")
    assert "| 55.6 | 50.0 | 66.7 | 57.1 | 70.0 | 75.0 | 53.3 |" in md
    assert "- base (3): sky, road, tree" in md
    assert "- novel (2): cat, dog" in md
    assert "![Training curve](train_curve.png)" in md and "![Per-class IoU](per_class_iou.png)" in md
    assert "params_hash: `abc123`" in md
    assert md.index("| 4 | tree |") < md.index("| 0 | sky |") < md.index("| 2 | cat |") < md.index("| 3 | dog |")
    assert "Reference bound" not in md
    assert "Reference bound" not in render_report("t", METRICS, _per_class_df(), {}, None)
    md = render_report("t", METRICS, _per_class_df(), {}, {"dataset": None, "split": None})
    assert "None" not in md and "Reference bound" not in md


@pytest.mark.parametrize("dataset,value", [("ade20k", "44.5"), ("coco_stuff_10k", "37.1")])
def test_reference_bound_only_for_real_datasets(dataset, value):
    md = render_report("t", METRICS, METRICS["per_class"], {}, {"dataset": dataset, "split": 2})
    assert "## Reference bound" in md
    sec = md[md.index("## Reference bound"):]
    assert f"**{value} mIoU**" in sec and "MaskFormer R50" in sec
    assert "not a reproduction" in sec and "upper bound" in sec
    assert "55.6 mIoU" in sec


def _check_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE


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
