"""DVC stage `report`: reports/report.md and a self-contained reports/report.html (the answer in
three lines first, then the evidence: metrics, split, per-class IoU, training curves, the
ablation grid with its warnings, the verdict on similarity transfer, a qualitative figure; the
run facts and training times last), reports/ablation.md, reports/ablation.json (per variant mean, std and n:
DVC metrics), the figures as PNG files, and the grid's MLflow parent run (per-variant means
and stds as metrics, the report as artifacts) with one child run per cell."""
from __future__ import annotations

import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import yaml

from pipeline.cli import add_inputs, load_params_raw, parser, run
from pipeline.io import read_json


def main() -> None:
    ap = parser(__doc__)
    add_inputs(ap, model=True, required=False)
    ap.add_argument("--metrics", type=Path, required=True, help="metrics JSON (evaluate stage)")
    ap.add_argument("--per-class", type=Path, required=True, help="per-class IoU CSV (evaluate stage)")
    ap.add_argument("--curve", type=Path, required=True, help="training curve CSV (train stage)")
    ap.add_argument("--retrain-metrics", type=Path, default=None,
                    help="metrics JSON of the pseudo-label retraining (retrain stage), if any")
    ap.add_argument("--cells", type=Path, default=None, help="ablation cells folder (ablate stages)")
    ap.add_argument("--baselines", type=Path, default=None, help="trivial baselines JSON (baselines stage)")
    ap.add_argument("--out", type=Path, required=True, help="report markdown to write")
    ap.add_argument("--ablation-md", type=Path, default=None, help="ablation markdown to write")
    ap.add_argument("--ablation-json", type=Path, default=None, help="ablation summary JSON (DVC metrics) to write")
    ap.add_argument("--html", type=Path, default=None, help="self-contained HTML report to write")
    ap.add_argument("--figures", type=Path, required=True, help="folder for the report's PNG figures")
    args = ap.parse_args()
    p, params_text, raw, g = load_params_raw(args.params)

    import pandas as pd

    from pipeline import repo, tracking
    from pipeline.ablation import cell_runs, grid_hash, main_run_name
    from pipeline.report import Inputs, write_report
    from pipeline.report import ablation as ab
    from pipeline.report.build import data_setting, grid_inputs

    grid, pp_weights, novel_masks = None, {}, {}
    if args.cells is not None and g is not None:
        grid, pp_weights, novel_masks = grid_inputs(args.cells, raw, g, p.train.iterations)
    have_model = None not in (args.model, args.dataset_dir, args.split_dir)
    retrain = (read_json(args.retrain_metrics).get("retrain") if args.retrain_metrics and args.retrain_metrics.is_file()
               else None)
    inputs = Inputs(
        title=p.report.title, dataset=p.data.dataset, split=p.data.split, metrics=read_json(args.metrics),
        per_class=pd.read_csv(args.per_class, keep_default_na=False, na_values=[""]), curve=pd.read_csv(args.curve),
        report_dir=args.out.parent, figures_dir=args.figures, smoothing=p.report.smoothing, retrain=retrain, grid=grid,
        run={"commit": repo.git_commit(Path.cwd()), "experiment": os.environ.get("DVC_EXP_NAME") or "workspace",
             "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "iterations": p.train.iterations,
             "seed": p.base.seed, "changed": changed_params(args.params, raw),
             "main_run": main_run_name(g, p.base.seed)},
        qualitative=(args.model, args.dataset_dir, read_json(args.split_dir / "index.json")) if have_model else None,
        baselines=read_json(args.baselines) if args.baselines and args.baselines.is_file() else None,
        pp_weights=pp_weights, novel_masks=novel_masks, data_setting=data_setting(p))
    write_report(inputs, args.out, args.html, args.ablation_md, args.ablation_json)

    if grid is not None and not args.no_mlflow:
        cells, table, variants = grid.cells, grid.table, grid.variants
        metrics = {r["key"]: r for r in cells.to_dict("records")}
        runs = cell_runs(raw, g, {k: {m: v[m] for m in ab.SUMMARY_KEYS} for k, v in metrics.items()})
        summary = {f"{v}.{m}.{stat}": x for v, ms in ab.ablation_summary(table).items() for m, st in ms.items()
                   for stat, x in st.items() if stat != "n" and x is not None}
        out = tracking.sync_grid(
            repo.store_root(), tracking.experiment_name(p.data.dataset, p.data.split),
            grid_hash([c["params_hash"] for c in runs]),
            {"ablation.seeds": g.seeds, "ablation.iterations": g.iterations, "ablation.variants": ",".join(variants),
             "cells": len(runs), **({"ablation.splits": g.splits} if g.splits else {})}, runs, summary, params_text,
            [x for x in (args.out, args.html, args.ablation_md, args.ablation_json) if x])
        print(f"MLflow: grid run {out['parent']} with {len(out['children'])} cell runs")
    print(f"report -> {args.out}" + "".join(f", {x}" for x in (args.ablation_md, args.ablation_json, args.html) if x))


def changed_params(path: Path, raw: dict) -> dict | None:
    """``{key: (value, committed value)}`` for the flattened params that differ from the params
    file in the last commit (what `dvc exp run -S` changed); None outside a git checkout."""
    from pipeline.config import flatten
    try:
        out = subprocess.run(["git", "show", f"HEAD:./{Path(path).name}"], capture_output=True, text=True,
                             timeout=20, cwd=Path(path).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    new, old = flatten(raw), flatten(yaml.safe_load(out.stdout) or {})
    return {k: (new.get(k), old.get(k)) for k in sorted(set(new) | set(old)) if new.get(k) != old.get(k)}


if __name__ == "__main__":
    run(main)
