"""DVC stage `ablate`: the ablation grid (params `ablation`), every cell of ablation.run x
ablation.splits x ablation.seeds (ablation.splits [] = data.split only).

A cell's params are the main params with the variant's overrides, its seed, its split and
ablation.iterations applied. A cell whose params equal the main training's reuses that model;
others train with a resumable checkpoint (<checkpoints>/<cell>/cell.pt: a finished one is only
evaluated again). Each cell is evaluated like the main model and written to <out>/<cell>/. A cell
is <variant>-<seed> on data.split (--split-dir, --init) and <variant>-s<split>-<seed> on another
split, whose split folder and weak-shot pre-training (the prepare and pretrain stages' work, with the
main params) this stage makes first, once per split, in <checkpoints>/split-<split>/. Cells train
ablation.workers at a time, each in its own process with a fixed number of torch threads
(train.threads, or cores // workers when that is 0), so a cell's result never depends on which
cells run beside it. How a cell runs and what it logs to MLflow: pipeline/grid.py.

ablation.executor: slurm submits the cells that are not finished yet (<out>/<cell>/cell.json with
the cell's params hash) as one Slurm job array instead (ablation.slurm; submitit's job files and
logs in <checkpoints>/.submitit/), waits for them and gathers their outputs: the same <out> as a
local grid. With MLFLOW_TRACKING_URI set the cells log to that server themselves; without it (the
SQLite store of this repository) they log nothing and this stage logs their outputs afterwards.
A failed cell is submitted once more; a second failure stops the grid. Ctrl-C or SIGTERM cancels
the jobs. docs/CLUSTER.md.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.cli import add_init, add_inputs, load_params_raw, parser, run


def main() -> None:
    ap = parser(__doc__)
    add_inputs(ap)
    add_init(ap)
    ap.add_argument("--main-model", type=Path, required=True, help="the main training's model (train stage)")
    ap.add_argument("--checkpoints", type=Path, required=True,
                    help="folder of the cells' resumable checkpoints (<cell>/cell.pt) and of the other splits' "
                         "split folders and weak-shot initialisations (split-<split>/)")
    ap.add_argument("--out", type=Path, required=True, help="folder of the cells' outputs (<cell>/)")
    ap.add_argument("--cell", action="append", default=None, metavar="CELL",
                    help="run only this cell, VARIANT-SEED or VARIANT-sSPLIT-SEED on another split than data.split "
                         "(repeatable; default: every cell of the grid). Outside DVC only: the stage's output is the "
                         "whole grid")
    args = ap.parse_args()
    main_p, text, raw, grid = load_params_raw(args.params)     # validates every cell's overrides before any work
    if grid is None:
        raise ValueError(f"{args.params} has no 'ablation' group: the ablate stage needs the grid")

    from tqdm import tqdm

    from pipeline.grid import RESULT_KEYS, log_gathered_cell, plan_cells, prepare_splits, run_cells
    from pipeline.jobs import cores

    slurm = grid.executor == "slurm"
    # on Slurm the cells reach a tracking server themselves, never this repository's SQLite store
    log_after = slurm and not args.no_mlflow and not os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    jobs, workers, threads = plan_cells(
        main_p, raw, grid, text, dataset_dir=args.dataset_dir, split_dir=args.split_dir, init=args.init,
        main_model=args.main_model, checkpoints=args.checkpoints, out=args.out, cores=cores(), only=args.cell,
        mlflow=not args.no_mlflow and not log_after, progress=not args.no_progress)
    if slurm:       # one clear error before anything is submitted or written
        from pipeline.executor import check_slurm
        check_slurm(grid.slurm)
    if log_after:
        from pipeline.repo import store_root
        from pipeline.tracking import open_client
        open_client(store_root())
    args.checkpoints.mkdir(parents=True, exist_ok=True)     # a DVC output even when nothing trains
    args.out.mkdir(parents=True, exist_ok=True)
    prepare_splits(main_p, jobs, args.dataset_dir, progress=not args.no_progress, cores=cores())
    each = (f"{threads} torch thread{'s' if threads > 1 else ''} each" if threads
            else "torch threads: a fair share of the cores")
    where = "Slurm job array, " if slurm else ""
    print(f"ablation grid: {len(jobs)} cell{'s' if len(jobs) > 1 else ''}, {where}{workers} at a time, {each}: "
          + ", ".join(j.key for j in jobs))
    bar = tqdm(total=len(jobs), desc="cells", unit="cell", disable=args.no_progress or workers == 1 or slurm)

    def done(job, r: dict) -> None:
        bar.update()
        took = "finished before: gathered" if r.get("gathered") else f"{r['seconds']:.0f} s"
        tqdm.write(f"cell {job.key}: " + "  ".join(f"{k} {r[k]:.2f}" for k in RESULT_KEYS) + f"  ({took})")

    with bar:
        run_cells(jobs, workers, done, grid=grid, folder=args.checkpoints / ".submitit")
    if log_after:
        for job in jobs:
            log_gathered_cell(job)
        print(f"logged the {len(jobs)} gathered cell{'s' if len(jobs) > 1 else ''} to MLflow")


if __name__ == "__main__":
    run(main)
