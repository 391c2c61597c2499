"""DVC stage `ablate@<variant>-<seed>`: one cell of the ablation grid (params `ablation`).

The cell's params are the main params with the variant's overrides, its seed and
ablation.iterations applied. A cell whose params equal the main training's reuses that
model (never trains twice); others train with a resumable checkpoint. The cell is then
evaluated like the main model. Its MLflow run (found again by params hash, so running again
never duplicates it) holds the cell's effective params file and, when it trained, its model.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from stages._common import (add_init, add_inputs, diagnostics_hook, load_init, load_params_raw, log_trained_model,
                            open_tracker, parser, read_json, run, training_callbacks, write_curve, write_eval_outputs)


def main() -> None:
    ap = parser(__doc__)
    add_inputs(ap)
    add_init(ap)
    ap.add_argument("--variant", required=True, help="variant name (a key of ablation.variants)")
    ap.add_argument("--seed", type=int, required=True, help="the cell's seed (one of ablation.seeds)")
    ap.add_argument("--main-model", type=Path, required=True, help="the main training's model (train stage)")
    ap.add_argument("--checkpoint", type=Path, required=True, help="the cell's resumable checkpoint")
    ap.add_argument("--out", type=Path, required=True, help="the cell's output folder")
    args = ap.parse_args()
    main_p, params_text, raw = load_params_raw(args.params)

    from pipeline.ablation import cell_params, parse_ablation, shares_main_training
    from pipeline.config import params_file_text, params_hash
    from pipeline.engine.checkpoint import load_checkpoint
    from pipeline.engine.evaluate import evaluate_model, load_trained
    from pipeline.engine.metrics import SUMMARY_KEYS
    from pipeline.engine.train import export_model, resolve_device, train
    from pipeline.io import atomic_dir, write_json
    from pipeline.jobs import CoreShare

    grid = parse_ablation(raw.get("ablation"))
    p = cell_params(raw, grid, args.variant, args.seed)
    phash = params_hash(p)
    split = read_json(args.split_dir / "split.json")
    index = read_json(args.split_dir / "index.json")
    shared = shares_main_training(main_p, p)
    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)   # a DVC output even when nothing trains
    tags = {"stage": "ablate", "variant": args.variant, "seed": str(args.seed)}
    # the shared cell reopens the main training's run (the main params file is its effective params)
    text = params_text if shared else params_file_text(p, f"ablation cell {args.variant}-{args.seed}")
    tracker = None if args.no_mlflow else open_tracker(p, text, tags, f"{args.variant}-seed{args.seed}",
                                                       include_finished=True)
    # FINISHED on success, FAILED on an error, KILLED on Ctrl-C / SIGTERM (RunTracker.__exit__)
    with tracker or contextlib.nullcontext(), CoreShare(p.train.threads) as cores:
        if shared:
            device = resolve_device(p.eval.device)
            model, _, _ = load_trained(args.main_model, device)
            history = load_checkpoint(args.main_model).get("history", [])
            print(f"cell {args.variant}-{args.seed} shares the main training: reusing {args.main_model}")
        else:
            device = resolve_device(p.train.device)
            model, out = train(p, args.dataset_dir, split, index, args.checkpoint,
                               on_log=training_callbacks(tracker, cores), progress=not args.no_progress,
                               init=load_init(args.init, p), diagnostics=diagnostics_hook(p, split))
            history = out.history
        model.eval()
        summary, per_class, _ = evaluate_model(model, args.dataset_dir, index, split, p, device,
                                               progress=not args.no_progress)
        with atomic_dir(args.out) as tmp:
            facts = write_eval_outputs(tmp / "metrics.json", tmp / "per_class_iou.csv", summary, per_class)
            write_json(tmp / "cell.json", {"variant": args.variant, "seed": args.seed, "params_hash": phash,
                                           "shared_with_main": shared, "iterations": p.train.iterations, **facts,
                                           "run_id": tracker.run_id if tracker else None})
            write_curve(tmp / "curve.csv", history)
            if not shared:
                export_model(model, p, split, tmp / "model.pt", history)
        if tracker:
            tracker.set_tags({"variant": args.variant, "seed": str(args.seed)})
            tracker.log_metrics({k: v for k, v in summary.items() if k in SUMMARY_KEYS})
            tracker.set_tags({f"eval.{k}": v for k, v in facts.items()})
            if not shared:
                log_trained_model(tracker, args.out / "model.pt", args.dataset_dir, index, cores, register=False)
    print(f"cell {args.variant}-{args.seed}: " + "  ".join(
        f"{k} {summary[k]:.2f}" for k in ("mIoU", "mIoU_base", "mIoU_novel", "hIoU")))


if __name__ == "__main__":
    run(main)
