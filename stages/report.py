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
    ap.add_argument("--retrain-metrics", type=Path, default=None,
                    help="metrics JSON of the pseudo-label retraining (retrain stage), if any")
    ap.add_argument("--out", type=Path, required=True, help="report markdown to write")
    ap.add_argument("--figures", type=Path, required=True, help="folder for the report's PNG figures")
    args = ap.parse_args()
    p, _ = load_params(args.params)

    import pandas as pd

    from pipeline.io import write_text
    from pipeline.report.figures import plot_per_class_iou, plot_training_curve
    from pipeline.report.tables import metrics_table_markdown, render_report

    metrics = json.loads(args.metrics.read_text())
    per_class = pd.read_csv(args.per_class)
    curve = pd.read_csv(args.curve)
    args.figures.mkdir(parents=True, exist_ok=True)
    figs = {"Training curve": args.figures / "train_curve.png", "Per-class IoU": args.figures / "per_class_iou.png"}
    plot_training_curve(curve, figs["Training curve"], p.report.smoothing)
    plot_per_class_iou(per_class, figs["Per-class IoU"])
    rel = {k: os.path.relpath(v, args.out.parent) for k, v in figs.items()}
    text = render_report(p.report.title, metrics, per_class, rel,
                         {"dataset": metrics.get("dataset"), "split": metrics.get("split")})
    if args.retrain_metrics is not None and args.retrain_metrics.is_file():
        retrain = json.loads(args.retrain_metrics.read_text())
        if retrain.get("enabled"):
            text += ("\n## Pseudo-label retraining\n\nThe train set relabelled by the model above (novel pixels "
                     "whose predicted class is in the image's labels, base pixels from ground truth), then a "
                     "fully supervised retraining on those labels. "
                     f"{retrain.get('pseudo_novel_precision', float('nan')):.1f}% of pseudo-labelled novel pixels "
                     "agree with the ground truth.\n\n" + metrics_table_markdown(retrain) + "\n")
    write_text(args.out, text)
    print(f"report -> {args.out}")


if __name__ == "__main__":
    run(main)
