"""Print a table of MLflow runs: `mlflow.search_runs` into pandas, filtered by experiment and
tags. Not a DVC stage: a command for comparing runs (ablation cells, experiments) in the
terminal, beside `mlflow ui`.

Examples:
  python -m tools.compare                                   # every run of the default experiment
  python -m tools.compare --tag variant=full --tag variant=baseline --group-by variant
  python -m tools.compare --experiment simformer-synthetic-split2 --columns mIoU,hIoU --csv runs.csv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cli import run

DEFAULT_COLUMNS = "mIoU_base,mIoU_novel,mIoU,hIoU,pAcc"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default=None,
                    help="MLflow experiment name (default: the one of params.yaml's data.dataset and data.split)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file for the default experiment")
    ap.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                    help="keep runs whose tag KEY equals VALUE; repeat a KEY to allow several values")
    ap.add_argument("--columns", default=DEFAULT_COLUMNS, help=f"metrics to show (default: {DEFAULT_COLUMNS})")
    ap.add_argument("--group-by", default=None, metavar="TAG",
                    help="aggregate runs by this tag (mean, std and count per group)")
    ap.add_argument("--csv", type=Path, default=None, help="also write the table to this CSV file")
    args = ap.parse_args()

    from pipeline import repo, tracking
    from pipeline.config import ConfigError

    experiment = args.experiment
    if experiment is None:
        from pipeline.cli import load_params
        p, _ = load_params(args.params)
        experiment = tracking.experiment_name(p.data.dataset, p.data.split)
    wanted: dict[str, list[str]] = {}
    for t in args.tag:
        if "=" not in t:
            raise ConfigError(f"--tag {t!r}: expected KEY=VALUE")
        k, v = t.split("=", 1)
        wanted.setdefault(k, []).append(v)
    df = search_runs_frame(repo.store_root(), experiment, wanted)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    table = runs_table(df, columns, args.group_by)
    if table.empty:
        print(f"no runs in experiment '{experiment}' match {wanted or 'any tag'}", file=sys.stderr)
        sys.exit(1)
    import pandas as pd
    with pd.option_context("display.max_rows", 500, "display.width", 200, "display.float_format", "{:.2f}".format):
        print(table.to_string())
    if args.csv is not None:
        from pipeline.io import atomic_path
        with atomic_path(args.csv) as tmp:
            table.to_csv(tmp)


def search_runs_frame(root, experiment: str, tags: dict[str, list[str]] | None = None):
    """``mlflow.search_runs`` of one experiment as a pandas DataFrame, filtered by tag values
    (several values of one tag are alternatives)."""
    import mlflow

    from pipeline.tracking import TrackingError, open_client, using_store
    open_client(root)                                    # fails clearly on a missing / locked store
    with using_store(root) as uri:
        if mlflow.get_experiment_by_name(experiment) is None:
            raise TrackingError(f"MLflow store {uri} has no experiment '{experiment}'")
        df = mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.start_time DESC"])
    for key, values in (tags or {}).items():
        col = f"tags.{key}"
        df = df[df[col].isin(values)] if col in df else df.iloc[0:0]
    if "grid_id" not in (tags or {}) and "tags.role" in df:      # a later grid's links repeat cached cells
        df = df[df["tags.role"] != "cell_link"]
    return df


def runs_table(df, metrics: list[str], group_by: str | None = None):
    """Run name, variant, seed, status and the chosen metrics; or mean/std/count per ``group_by`` tag."""
    import pandas as pd

    cols = {"tags.mlflow.runName": "run", "tags.variant": "variant", "tags.seed": "seed", "status": "status",
            "tags.params_hash": "params_hash"}
    out = pd.DataFrame({new: df[old] for old, new in cols.items() if old in df})
    for m in metrics:
        out[m] = df[f"metrics.{m}"] if f"metrics.{m}" in df else float("nan")
    if group_by is None or out.empty:
        return out.reset_index(drop=True)
    if group_by not in out:
        out[group_by] = df.get(f"tags.{group_by}")
    return out.groupby(group_by)[metrics].agg(["mean", "std", "count"])


if __name__ == "__main__":
    run(main)
