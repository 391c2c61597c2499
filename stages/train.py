"""DVC stage `train`: train SimFormer (MaskFormer + complementary and dual similarity losses).

Runs on CUDA when present (train.device: auto), else on CPU. Resumes from --checkpoint
when it holds a checkpoint of the same params. Logs params, the whole params file,
per-step losses and the trained model to MLflow (SQLite store at the repository root,
found through $DVC_ROOT under `dvc exp run`).
"""
from __future__ import annotations

from pathlib import Path

from stages._common import load_params, open_tracker, parser, read_json, run, step_logger, write_curve


def main() -> None:
    from pipeline.config import describe
    ap = parser(__doc__, epilog="params keys (params.yaml):\n" + describe())
    ap.add_argument("--dataset-dir", type=Path, required=True, help="prepared dataset folder")
    ap.add_argument("--split-dir", type=Path, required=True, help="split folder (split.json, index.json)")
    ap.add_argument("--model", type=Path, required=True, help="trained model file to write")
    ap.add_argument("--checkpoint", type=Path, required=True, help="resumable checkpoint (kept across runs)")
    ap.add_argument("--curve", type=Path, required=True, help="training curve CSV to write")
    ap.add_argument("--run-name", default=None, help="MLflow run name (default: dataset-split-hash)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    args = ap.parse_args()
    p, params_text = load_params(args.params)
    split = read_json(args.split_dir / "split.json")
    index = read_json(args.split_dir / "index.json")

    from pipeline.config import params_hash
    from pipeline.engine.train import export_model, train

    run_name = args.run_name or f"{p.data.dataset}-split{p.data.split}-{params_hash(p)[:8]}"
    tracker = None if args.no_mlflow else open_tracker(p, params_text, {"stage": "train"}, run_name)
    try:
        model, out = train(p, args.dataset_dir, split, index, args.checkpoint, on_log=step_logger(tracker),
                           progress=not args.no_progress)
        export_model(model, p, split, args.model, out.history)
        write_curve(args.curve, out.history)
        if tracker:
            tracker.log_artifact(args.model, "model")
            tracker.finish("FINISHED")
    except BaseException:
        if tracker:
            tracker.finish("FAILED")
        raise
    last = out.history[-1] if out.history else {}
    print(f"trained {out.steps} steps (resumed from {out.resumed_from}) in {out.seconds:.0f}s; "
          f"final loss {last.get('loss', float('nan')):.4f}; model -> {args.model}")


if __name__ == "__main__":
    run(main)
