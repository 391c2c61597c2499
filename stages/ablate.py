"""DVC stage `ablate`: the ablation grid (params `ablation`), every cell of ablation.run x ablation.seeds.

A cell's params are the main params with the variant's overrides, its seed and
ablation.iterations applied. A cell whose params equal the main training's reuses that model;
others train with a resumable checkpoint (<checkpoints>/<variant>-<seed>/cell.pt: a finished one
is only evaluated again). Each cell is evaluated like the main model and written to
<out>/<variant>-<seed>/. Cells train ablation.workers at a time, each in its own process with a
fixed number of torch threads (train.threads, or cores // workers when that is 0), so a cell's
result never depends on which cells run beside it. How a cell runs and what it logs to MLflow:
pipeline/grid.py.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.cli import add_init, add_inputs, load_params_raw, parser, run


def main() -> None:
    ap = parser(__doc__)
    add_inputs(ap)
    add_init(ap)
    ap.add_argument("--main-model", type=Path, required=True, help="the main training's model (train stage)")
    ap.add_argument("--checkpoints", type=Path, required=True,
                    help="folder of the cells' resumable checkpoints (<variant>-<seed>/cell.pt)")
    ap.add_argument("--out", type=Path, required=True, help="folder of the cells' outputs (<variant>-<seed>/)")
    ap.add_argument("--cell", action="append", default=None, metavar="VARIANT-SEED",
                    help="run only this cell (repeatable; default: every cell of the grid). Outside DVC only: "
                         "the stage's output is the whole grid")
    args = ap.parse_args()
    main_p, text, raw, grid = load_params_raw(args.params)     # validates every cell's overrides before any work
    if grid is None:
        raise ValueError(f"{args.params} has no 'ablation' group: the ablate stage needs the grid")

    from tqdm import tqdm

    from pipeline.grid import RESULT_KEYS, plan_cells, run_cells
    from pipeline.jobs import cores

    jobs, workers, threads = plan_cells(
        main_p, raw, grid, text, dataset_dir=args.dataset_dir, split_dir=args.split_dir, init=args.init,
        main_model=args.main_model, checkpoints=args.checkpoints, out=args.out, cores=cores(), only=args.cell,
        mlflow=not args.no_mlflow, progress=not args.no_progress)
    args.checkpoints.mkdir(parents=True, exist_ok=True)     # a DVC output even when nothing trains
    args.out.mkdir(parents=True, exist_ok=True)
    each = (f"{threads} torch thread{'s' if threads > 1 else ''} each" if threads
            else "torch threads: a fair share of the cores")
    print(f"ablation grid: {len(jobs)} cell{'s' if len(jobs) > 1 else ''}, {workers} at a time, {each}: "
          + ", ".join(j.key for j in jobs))
    bar = tqdm(total=len(jobs), desc="cells", unit="cell", disable=args.no_progress or workers == 1)

    def done(job, r: dict) -> None:
        bar.update()
        tqdm.write(f"cell {job.key}: " + "  ".join(f"{k} {r[k]:.2f}" for k in RESULT_KEYS) + f"  ({r['seconds']:.0f} s)")

    with bar:
        run_cells(jobs, workers, done)


if __name__ == "__main__":
    run(main)
