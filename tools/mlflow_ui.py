"""Print where things are in the MLflow UI for this repository's store (`make ui` runs this, then
serves the store on http://127.0.0.1:5000).

MLflow 3 opens on a GenAI home page; the training runs are in the experiment's runs table,
which this prints with ``workflowType=machine_learning`` (the model-training view). Also
printed: the experiment's Models tab (logged models with their evaluation metrics), the
registered model's page with the version holding the alias ``champion`` (and that version's
page) and the newest (``models:/<name>/latest``),
and how to load the champion. Where each thing is: docs/MLFLOW_UI.md.

Examples:
  python -m tools.mlflow_ui                       # the experiment of params.yaml's data.dataset / data.split
  python -m tools.mlflow_ui --experiment simformer-ade20k-split1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cli import run


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.mlflow_ui", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default=None,
                    help="MLflow experiment name (default: the one of params.yaml's data.dataset and data.split)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file for the default experiment")
    args = ap.parse_args()

    from pipeline import repo, tracking
    experiment = args.experiment
    if experiment is None:
        from pipeline.cli import load_params
        p, _ = load_params(args.params)
        experiment = tracking.experiment_name(p.data.dataset, p.data.split)
    root = repo.store_root()
    links = tracking.ui_links(root, experiment)
    if links is None:
        others = [e for e in tracking.open_client(root).search_experiments() if e.name.startswith("simformer-")]
        print(f"the MLflow store {tracking.tracking_uri(root)} has no experiment '{experiment}' yet "
              "(`make repro` or `dvc exp run` creates it)" + (":" if others else "."), file=sys.stderr)
        for e in others:
            print(f"  {e.name}: {tracking.runs_url(e.experiment_id)}")
        return
    print(f"MLflow experiment {experiment} (id {links['experiment_id']}):")
    print(f"  runs table:          {links['runs']}")
    print(f"  logged models:       {links['models']}")
    alias = ", ".join(f"{a}: version {links[a]}" for a in (tracking.CHAMPION, tracking.LATEST) if links[a])
    print(f"  registered model:    {links['registry']}" + (f"  ({alias})" if alias else "  (nothing registered yet)"))
    if links[tracking.CHAMPION]:
        print(f"  champion version:    {tracking.model_version_url(experiment, links[tracking.CHAMPION])}")
        print(f"  load the champion:   mlflow.pyfunc.load_model(\"models:/{experiment}@{tracking.CHAMPION}\")  or  "
              f"python -m tools.predict --model models:/{experiment}@{tracking.CHAMPION} ...")


if __name__ == "__main__":
    run(main)
