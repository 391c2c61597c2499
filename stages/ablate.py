"""DVC stage `ablate`: the ablation grid (params `ablation`), every cell of ablation.run x ablation.seeds.

A cell's params are the main params with the variant's overrides, its seed and
ablation.iterations applied. A cell whose params equal the main training's reuses that
model (never trains twice); others train with a resumable checkpoint
(<checkpoints>/<variant>-<seed>/cell.pt: a finished one is only evaluated again). Each cell
is evaluated like the main model and written to <out>/<variant>-<seed>/.

Cells train ablation.workers at a time, each in its own process with a fixed number of
torch threads: train.threads, or cores // workers when that is 0 (workers 1: the fair share
of pipeline.jobs.CoreShare). A cell's result therefore never depends on which cells run
beside it; it is bit-identical on one machine for the same threads (cell.json and the MLflow
tag torch_threads record them). The longest cells start first.

Each cell's MLflow run (found again by params hash, so running again never duplicates it)
holds the cell's effective params file and, when it trained, its model. A finished run is
history: it is reopened only to re-evaluate the finished checkpoint it recorded, and gets only
metrics it lacks. A cell that trains again although a finished run of its params exists (its
checkpoint was removed), or whose finished checkpoint evaluates to other numbers than the run
recorded (a checkpoint trained elsewhere, or with other threads), gets a new run, tagged
``differs_from_run_id`` when the old one's metrics disagree.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from stages._common import (add_init, add_inputs, diagnostics_hook, load_init, load_params_raw, log_trained_model,
                            open_tracker, parser, read_json, run, training_callbacks, write_curve, write_eval_outputs)

SIMILARITY_COST = 1.7       # a step with SimLoss / DistLoss against one without (start order only)


def finished_checkpoint(path: Path, phash: str, iterations: int) -> bool:
    """True when ``path`` holds the final checkpoint of the params with hash ``phash``."""
    from pipeline.engine.checkpoint import load_checkpoint
    if not path.is_file():
        return False
    ck = load_checkpoint(path)
    return ck.get("params_hash") == phash and int(ck.get("step", -1)) == iterations


def run_cell(job: dict) -> dict:
    """Train (or reuse) and evaluate one cell; write ``job["out"]``; log to MLflow. Returns the summary."""
    from pipeline.ablation import cell_params, parse_ablation, shares_main_training
    from pipeline.config import params_file_text, params_hash
    from pipeline.engine.checkpoint import load_checkpoint
    from pipeline.engine.evaluate import evaluate_model, load_trained
    from pipeline.engine.metrics import SUMMARY_KEYS
    from pipeline.engine.train import export_model, resolve_device, train
    from pipeline.io import atomic_dir, write_json
    from pipeline.jobs import CoreShare
    from pipeline.tracking import metric_key

    start = time.perf_counter()
    variant, seed, progress = job["variant"], job["seed"], job["progress"]
    main_p, params_text, raw = load_params_raw(job["params"])
    p = cell_params(raw, parse_ablation(raw.get("ablation")), variant, seed)
    dataset_dir, out, ckpt = Path(job["dataset_dir"]), Path(job["out"]), Path(job["checkpoint"])
    split, index = read_json(Path(job["split_dir"]) / "split.json"), read_json(Path(job["split_dir"]) / "index.json")
    shared = shares_main_training(main_p, p)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tags = {"stage": "ablate", "variant": variant, "seed": str(seed)}
    # the shared cell reopens the main training's run (the main params file is its effective params)
    text = params_text if shared else params_file_text(p, f"ablation cell {variant}-{seed}")
    phash, name = params_hash(p), f"{variant}-seed{seed}"
    # only an evaluation (shared cell, finished checkpoint) may reopen a finished run; a training gets its own
    evaluation_only = shared or finished_checkpoint(ckpt, phash, p.train.iterations)
    tracker = None if job["no_mlflow"] else open_tracker(p, text, tags, name, include_finished=evaluation_only)
    reopened = tracker is not None and tracker.status == "FINISHED"
    # FINISHED on success, FAILED on an error, KILLED on Ctrl-C / SIGTERM (RunTracker.__exit__)
    with contextlib.ExitStack() as runs, CoreShare(job["threads"]) as cores:
        if tracker:
            runs.enter_context(tracker)
        if shared:
            device = resolve_device(p.eval.device)
            model, _, _ = load_trained(Path(job["main_model"]), device)
            history = load_checkpoint(Path(job["main_model"])).get("history", [])
            print(f"cell {variant}-{seed} shares the main training: reusing {job['main_model']}")
        else:
            device = resolve_device(p.train.device)
            model, result = train(p, dataset_dir, split, index, ckpt,
                                  on_log=training_callbacks(None if reopened else tracker, cores), progress=progress,
                                  init=load_init(Path(job["init"]) if job["init"] else None, p),
                                  diagnostics=diagnostics_hook(p, split))
            history = result.history
        model.eval()
        summary, per_class, _ = evaluate_model(model, dataset_dir, index, split, p, device, progress=progress)
        metrics = {k: v for k, v in summary.items() if k in SUMMARY_KEYS}
        if reopened:
            logged = tracker.client.get_run(tracker.run_id).data.metrics
            if any(logged.get(metric_key(k), v) != v for k, v in metrics.items()):
                # not the result that run recorded: it stays as it is, and this result gets a run of its own
                old = tracker.run_id
                tracker = runs.enter_context(open_tracker(p, text, {**tags, "differs_from_run_id": old}, name))
                reopened = False
                print(f"cell {variant}-{seed}: the finished MLflow run {old} of these params recorded other metrics; "
                      f"logging to a new run {tracker.run_id}")
                for rec in history:                  # the curve of the checkpoint's own training
                    tracker.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=rec.get("step"))
            else:
                metrics = {k: v for k, v in metrics.items() if metric_key(k) not in logged}
        with atomic_dir(out) as tmp:
            facts = write_eval_outputs(tmp / "metrics.json", tmp / "per_class_iou.csv", summary, per_class)
            write_json(tmp / "cell.json", {"variant": variant, "seed": seed, "params_hash": phash,
                                           "shared_with_main": shared, "iterations": p.train.iterations,
                                           "torch_threads": cores.used[-1] if cores.used else None, **facts,
                                           "run_id": tracker.run_id if tracker else None})
            write_curve(tmp / "curve.csv", history)
            if not shared:
                export_model(model, p, split, tmp / "model.pt", history)
        if tracker:
            tracker.set_tags({"variant": variant, "seed": str(seed)})
            tracker.log_metrics(metrics)
            tracker.set_tags({f"eval.{k}": v for k, v in facts.items()})
            if not shared and not reopened:
                log_trained_model(tracker, out / "model.pt", dataset_dir, index, cores, register=False)
    return {k: summary[k] for k in ("mIoU", "mIoU_base", "mIoU_novel", "hIoU")} | {
        "seconds": time.perf_counter() - start, "shared": shared}


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
    main_p, _, raw = load_params_raw(args.params)      # validates every cell's overrides before any work

    from tqdm import tqdm

    from pipeline.ablation import cell_key, cell_params, parse_ablation, shares_main_training
    from pipeline.jobs import cores, run_parallel

    grid = parse_ablation(raw.get("ablation"))
    cells = grid.cells()
    if args.cell:
        keys = {cell_key(v, s): (v, s) for v, s in cells}
        unknown = [c for c in args.cell if c not in keys]
        if unknown:
            raise ValueError(f"--cell {unknown[0]!r} is not a cell of the grid; cells: {', '.join(keys)}")
        cells = [keys[c] for c in dict.fromkeys(args.cell)]
    workers = min(grid.workers, len(cells))
    threads = main_p.train.threads or (0 if workers == 1 else max(1, cores() // workers))

    def cost(v: str, s: int) -> float:
        p = cell_params(raw, grid, v, s)
        if shares_main_training(main_p, p):
            return 0.0
        return p.train.iterations * (SIMILARITY_COST if p.loss.sim_weight > 0 or p.loss.pp_weight > 0 else 1.0)

    order = sorted(cells, key=lambda c: -cost(*c))         # longest first; stable otherwise
    jobs = [{"variant": v, "seed": s, "params": str(args.params), "dataset_dir": str(args.dataset_dir),
             "split_dir": str(args.split_dir), "init": str(args.init) if args.init else None,
             "main_model": str(args.main_model), "checkpoint": str(args.checkpoints / cell_key(v, s) / "cell.pt"),
             "out": str(args.out / cell_key(v, s)), "threads": threads, "no_mlflow": args.no_mlflow,
             "progress": workers == 1 and not args.no_progress} for v, s in order]
    args.checkpoints.mkdir(parents=True, exist_ok=True)     # a DVC output even when nothing trains
    args.out.mkdir(parents=True, exist_ok=True)
    each = (f"{threads} torch thread{'s' if threads > 1 else ''} each" if threads
            else "torch threads: a fair share of the cores")
    print(f"ablation grid: {len(jobs)} cell{'s' if len(jobs) > 1 else ''}, {workers} at a time, {each}: "
          + ", ".join(cell_key(v, s) for v, s in order))
    bar = tqdm(total=len(jobs), desc="cells", unit="cell", disable=args.no_progress or workers == 1)

    def done(job: dict, r: dict) -> None:
        bar.update()
        tqdm.write(f"cell {cell_key(job['variant'], job['seed'])}: " + "  ".join(
            f"{k} {r[k]:.2f}" for k in ("mIoU", "mIoU_base", "mIoU_novel", "hIoU")) + f"  ({r['seconds']:.0f} s)")

    with bar:
        run_parallel(run_cell, jobs, workers, done)


if __name__ == "__main__":
    run(main)
