"""Run the pipeline where neither DVC nor MLflow is installed (a lent GPU machine, a cluster node)
and write one self-describing bundle of its results, to bring home with `python -m tools.import_runs`.

Every stage the ablation grid and the report need runs in dvc.yaml's order (download, prepare,
baselines, pretrain, train, evaluate, ablate, report; retrain only with pseudo.enabled), each by its
own command from dvc.yaml, with --params naming params.yaml with the -S overrides applied (written
into the bundle; params.yaml itself is never changed), --no-progress and --no-mlflow. Nothing is
skipped as up to date (this is not DVC), but the train stage and the grid's cells resume from their
checkpoints. The bundle: manifest.json (params, overrides, commit, host, device, versions, times per
stage, command line, files), params.yaml, dvc.yaml, logs/, outputs/ (reports/ and the grid's cell
folders, without model files unless --keep-models), and <out>.tar.gz, refused over --max-mib.
Layout and contract: pipeline/offline.py; docs/OFFLINE.md.

Examples:
  python -m tools.offline_run --out /tmp/offline/h200-grid -S 'ablation.seeds=[6,7,8]' --device cuda
  python -m tools.offline_run --out /tmp/offline/pp --stages train evaluate ablate report -S loss.pp_weight=0.5

On CUDA the grid's cells train ablation.workers at a time, each in its own process on the one GPU
(pipeline/jobs.py run_parallel; train.threads, else cores // workers CPU threads each). Processes,
not CUDA streams in one process, share the GPU: a cell's step is mostly Python and CPU work for a
model this small (data loading, Hungarian matching on the CPU, loss bookkeeping, kernel launches),
which one interpreter would serialise under its GIL, while separate processes overlap one cell's CPU
work with another's kernels; each process has its own RNG streams, backend flags and CUDA context,
so a cell computes what it computes alone (the grid's reproducibility contract), and a failed cell
stops without corrupting the others' state. The GPU time-slices between the processes' contexts
(with NVIDIA MPS running, their kernels run concurrently). The pool's workers are not daemonic, so a
cell's DataLoader may start its own workers (train.workers > 0, as the paper presets set).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from pipeline.cli import _Debug, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="bundle folder to write (new or empty)")
    ap.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="set a params key as `dvc exp run -S` does (YAML value; repeatable), e.g. "
                         "-S loss.pp_weight=0.5 -S 'ablation.seeds=[6,7]'")
    ap.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                    help="run these stages of dvc.yaml (in its order) instead of every stage the grid and the report "
                         "need")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                    help="set train.device and eval.device (default: as the params say; cuda fails at once without "
                         "a CUDA device)")
    ap.add_argument("--keep-models", action="store_true",
                    help="bundle the model files too (the main model and each cell's model.pt)")
    ap.add_argument("--tar", type=Path, default=None, help="the bundle's .tar.gz (default: <out>.tar.gz)")
    ap.add_argument("--max-mib", type=float, default=16.0,
                    help="fail when the .tar.gz is larger (default 16: what the GPU machine returns per file)")
    ap.add_argument("--commit", default=None,
                    help="the commit of this tree when it is no git checkout (a copied working tree); recorded in "
                         "the manifest")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"),
                    help="the params file the overrides apply to (default: params.yaml)")
    ap.add_argument("--debug", action=_Debug, help="print the traceback of a failure")
    args = ap.parse_args()

    from pipeline.offline import run_offline
    run_offline(Path("dvc.yaml"), args.params, args.out, overrides=args.overrides, stages=args.stages,
                device=args.device, keep_models=args.keep_models, tar=args.tar, max_mib=args.max_mib,
                commit=args.commit, command=shlex.join(["python", "-m", "tools.offline_run", *sys.argv[1:]]))


if __name__ == "__main__":
    run(main)
