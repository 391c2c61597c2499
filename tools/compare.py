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

from stages._common import run

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

    from pipeline import tracking
    from pipeline.config import ConfigError

    experiment = args.experiment
    if experiment is None:
        from stages._common import load_params
        p, _ = load_params(args.params)
        experiment = tracking.experiment_name(p.data.dataset, p.data.split)
    wanted: dict[str, list[str]] = {}
    for t in args.tag:
        if "=" not in t:
            raise ConfigError(f"--tag {t!r}: expected KEY=VALUE")
        k, v = t.split("=", 1)
        wanted.setdefault(k, []).append(v)
    df = tracking.search_runs_frame(tracking.store_root(), experiment, wanted)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    table = tracking.runs_table(df, columns, args.group_by)
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


if __name__ == "__main__":
    run(main)
