"""Import an offline bundle (`python -m tools.offline_run`) into this repository's MLflow store.

The bundle (its folder or its .tar.gz) becomes new runs in the experiment of its dataset and split
(or --experiment): the main model (training curve, metrics; the grid cell that shares its training
in the same run, as at home) and one run per grid cell (curve, metrics, held-out AUCs), each tagged
with where it came from (source: offline bundle, offline.host, offline.device, offline.torch,
offline.commit, offline.manifest_digest, offline.imported_at) and offline.content_digest, the
digest of the files it was logged from. Importing the same bundle again adds nothing; no run
already in the store is changed. --report-out also writes the bundle's report (report.md,
ablation.md, ablation.json, figures/) with a README.md of its provenance. docs/OFFLINE.md.

Examples:
  python -m tools.import_runs offline/h200-grid.tar.gz
  python -m tools.import_runs offline/h200-grid --report-out reports/offline/h200-grid
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import _Debug, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, help="the bundle folder or its .tar.gz")
    ap.add_argument("--experiment", default=None,
                    help="MLflow experiment (default: simformer-<dataset>-split<k> of the bundle's params)")
    ap.add_argument("--report-out", type=Path, default=None,
                    help="also write the bundle's report into this folder (new, empty, or written here before)")
    ap.add_argument("--no-mlflow", action="store_true", help="import nothing (with --report-out: the report only)")
    ap.add_argument("--debug", action=_Debug, help="print the traceback of a failure")
    args = ap.parse_args()

    from pipeline.offline import import_bundle, write_bundle_report
    if not args.bundle.exists():
        raise FileNotFoundError(f"bundle '{args.bundle}' does not exist")
    if not args.no_mlflow:
        from pipeline.repo import store_root
        import_bundle(args.bundle, store_root(), args.experiment)
    if args.report_out is not None:
        files = write_bundle_report(args.bundle, args.report_out)
        print(f"report -> {args.report_out}: {', '.join(f for f in files if '/' not in f)}, figures/")


if __name__ == "__main__":
    run(main)
