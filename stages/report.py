"""DVC stage `report`: reports/report.md with the metrics table, split summary, per-class
IoU, the training curve and per-class IoU figures (PNG)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from stages._common import load_params, parser, run


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--metrics", type=Path, required=True, help="metrics JSON (evaluate stage)")
    ap.add_argument("--per-class", type=Path, required=True, help="per-class IoU CSV (evaluate stage)")
    ap.add_argument("--curve", type=Path, required=True, help="training curve CSV (train stage)")
    ap.add_argument("--out", type=Path, required=True, help="report markdown to write")
    ap.add_argument("--figures", type=Path, required=True, help="folder for the report's PNG figures")
    args = ap.parse_args()
    p, _ = load_params(args.params)

    import pandas as pd

    from pipeline.io import write_text
    from pipeline.report.figures import plot_per_class_iou, plot_training_curve
    from pipeline.report.tables import render_report

    metrics = json.loads(args.metrics.read_text())
    per_class = pd.read_csv(args.per_class)
    curve = pd.read_csv(args.curve)
    args.figures.mkdir(parents=True, exist_ok=True)
    figs = {"Training curve": args.figures / "train_curve.png", "Per-class IoU": args.figures / "per_class_iou.png"}
    plot_training_curve(curve, figs["Training curve"], p.report.smoothing)
    plot_per_class_iou(per_class, figs["Per-class IoU"])
    rel = {k: os.path.relpath(v, args.out.parent) for k, v in figs.items()}
    write_text(args.out, render_report(p.report.title, metrics, per_class, rel,
                                       {"dataset": metrics.get("dataset"), "split": metrics.get("split")}))
    print(f"report -> {args.out}")


if __name__ == "__main__":
    run(main)
