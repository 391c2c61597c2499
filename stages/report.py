"""DVC stage `report`: reports/report.md (metrics, split, per-class IoU, figures),
reports/ablation.md (the ablation grid: mean ± std over seeds, difference to the baseline),
a self-contained reports/report.html, the figures as PNG files, and the grid's MLflow
parent run with one child run per cell."""
from __future__ import annotations

import json
import os
from pathlib import Path

from stages._common import add_inputs, load_params_raw, parser, read_json, run


def main() -> None:
    ap = parser(__doc__)
    add_inputs(ap, model=True, required=False)
    ap.add_argument("--metrics", type=Path, required=True, help="metrics JSON (evaluate stage)")
    ap.add_argument("--per-class", type=Path, required=True, help="per-class IoU CSV (evaluate stage)")
    ap.add_argument("--curve", type=Path, required=True, help="training curve CSV (train stage)")
    ap.add_argument("--retrain-metrics", type=Path, default=None,
                    help="metrics JSON of the pseudo-label retraining (retrain stage), if any")
    ap.add_argument("--cells", type=Path, default=None, help="ablation cells folder (ablate stages)")
    ap.add_argument("--out", type=Path, required=True, help="report markdown to write")
    ap.add_argument("--ablation-md", type=Path, default=None, help="ablation markdown to write")
    ap.add_argument("--html", type=Path, default=None, help="self-contained HTML report to write")
    ap.add_argument("--figures", type=Path, required=True, help="folder for the report's PNG figures")
    args = ap.parse_args()
    p, params_text, raw = load_params_raw(args.params)

    import pandas as pd

    from pipeline.io import write_text
    from pipeline.report.figures import plot_per_class_iou, plot_training_curve
    from pipeline.report.tables import metrics_table_markdown, render_report

    metrics = read_json(args.metrics)
    per_class = pd.read_csv(args.per_class, keep_default_na=False, na_values=[""])
    curve = pd.read_csv(args.curve)
    args.figures.mkdir(parents=True, exist_ok=True)
    figs = {"Training curve": args.figures / "train_curve.png", "Per-class IoU": args.figures / "per_class_iou.png"}
    plot_training_curve(curve, figs["Training curve"], p.report.smoothing)
    plot_per_class_iou(per_class, figs["Per-class IoU"])
    rel = {k: os.path.relpath(v, args.out.parent) for k, v in figs.items()}
    text = render_report(p.report.title, metrics, per_class, rel,
                         {"dataset": metrics.get("dataset"), "split": metrics.get("split")})
    if args.retrain_metrics is not None and args.retrain_metrics.is_file():
        retrain = read_json(args.retrain_metrics)
        if retrain.get("enabled"):
            text += ("\n## Pseudo-label retraining\n\nThe train set relabelled by the model above (novel pixels "
                     "whose predicted class is in the image's labels, base pixels from ground truth), then a "
                     "fully supervised retraining on those labels. "
                     f"{retrain.get('pseudo_novel_precision', float('nan')):.1f}% of pseudo-labelled novel pixels "
                     "agree with the ground truth.\n\n" + metrics_table_markdown(retrain) + "\n")
    sections = [("Results", text)]
    if args.model is not None and args.dataset_dir is not None and args.split_dir is not None:
        qual = args.figures / "qualitative.png"
        _qualitative(args.model, args.dataset_dir, args.split_dir, qual)
        figs["Qualitative results"] = qual
        text += (f"\n## Qualitative results\n\nImage, ground truth, prediction, and the top proposals "
                 f"(class, score, binary mask; * = novel class).\n\n![qualitative]"
                 f"({os.path.relpath(qual, args.out.parent)})\n")
        sections = [("Results", text)]
    write_text(args.out, text)

    cells = None
    if args.cells is not None and "ablation" in raw:
        ablation_text, ablation_figs, cells = _ablation(args, p, raw)
        figs.update(ablation_figs)
        sections.append(("Ablation", ablation_text))
    if args.html is not None:
        from pipeline.report.html import render_html
        write_text(args.html, render_html(p.report.title, sections, figs))
    if cells is not None and not args.no_mlflow:
        _sync_mlflow(p, raw, params_text, cells, [x for x in (args.out, args.ablation_md, args.html) if x])
    print(f"report -> {args.out}" + (f", {args.ablation_md}" if args.ablation_md else "")
          + (f", {args.html}" if args.html else ""))


def _qualitative(model_path: Path, dataset_dir: Path, split_dir: Path, out_png: Path, n: int = 3) -> None:
    import torch

    from pipeline.data.catalog import load_class_table
    from pipeline.data.dataset import read_image, read_label
    from pipeline.engine.evaluate import load_trained
    from pipeline.report.qualitative import qualitative_figure

    model, _, split = load_trained(model_path, torch.device("cpu"))
    index = read_json(split_dir / "index.json")
    table = load_class_table(dataset_dir)
    images = []
    for e in index["test"][:n]:
        img = read_image(dataset_dir / e["image"])
        images.append((Path(e["image"]).stem, img, read_label(dataset_dir / e["label"], img.shape[:2])))
    qualitative_figure(model, images, [c["name"] for c in table], [c["color"] for c in table], split["novel"],
                       out_png, top_k=3, device=torch.device("cpu"))


def _ablation(args, p, raw):
    from pipeline.ablation import cell_key, parse_ablation
    from pipeline.io import write_text
    from pipeline.report import ablation as ab
    from pipeline.report.ablation import plot_novel_class_iou, plot_variant_curves

    grid = parse_ablation(raw["ablation"])
    variants = list(grid.variants)
    wanted = {cell_key(v, s) for v, s in grid.cells()}
    cells_df = ab.load_cells(args.cells)
    cells_df = cells_df[[cell_key(v, s) in wanted for v, s in zip(cells_df["variant"], cells_df["seed"])]]
    missing = sorted(wanted - {cell_key(v, s) for v, s in zip(cells_df["variant"], cells_df["seed"])})
    if missing:
        raise FileNotFoundError(f"ablation cells missing from '{args.cells}': {', '.join(missing)} "
                                "(run `dvc repro` to train them)")
    table = ab.ablation_table(cells_df, variants, baseline="baseline" if "baseline" in variants else variants[0])
    text = ab.ablation_markdown(table, f"{p.report.title}: ablation", dataset=p.data.dataset)
    figs = {"Novel-class IoU per variant": args.figures / "novel_class_iou.png",
            "Training curves per variant": args.figures / "variant_curves.png"}
    plot_novel_class_iou(ab.novel_class_iou(args.cells, variants), figs["Novel-class IoU per variant"])
    plot_variant_curves(args.cells, variants, figs["Training curves per variant"], p.report.smoothing)
    base = args.ablation_md.parent if args.ablation_md else args.out.parent
    text += "\n" + "\n".join(f"![{k}]({os.path.relpath(v, base)})\n" for k, v in figs.items())
    if args.ablation_md is not None:
        write_text(args.ablation_md, text)
    cells = [{**json.loads((args.cells / cell_key(v, s) / "cell.json").read_text()),
              "metrics": json.loads((args.cells / cell_key(v, s) / "metrics.json").read_text())}
             for v, s in grid.cells()]
    return text, figs, cells


def _sync_mlflow(p, raw, params_text, cells, artifacts) -> None:
    from pipeline import tracking
    from pipeline.ablation import cell_params, grid_hash, parse_ablation
    from pipeline.config import flatten, to_dict

    grid = parse_ablation(raw["ablation"])
    for c in cells:
        c["params_flat"] = flatten(to_dict(cell_params(raw, grid, c["variant"], c["seed"])))
    gid = grid_hash([c["params_hash"] for c in cells])
    grid_params = {"ablation.seeds": grid.seeds, "ablation.iterations": grid.iterations,
                   "ablation.variants": ",".join(grid.variants), "cells": len(cells)}
    out = tracking.sync_grid(tracking.store_root(), tracking.experiment_name(p.data.dataset, p.data.split), gid,
                             grid_params, cells, params_text, artifacts)
    print(f"MLflow: grid run {out['parent']} with {len(out['children'])} cell runs")


if __name__ == "__main__":
    run(main)
