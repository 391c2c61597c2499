"""DVC stage `train`: train SimFormer (MaskFormer + complementary and dual similarity losses).

Runs on CUDA when present (train.device: auto), else on CPU. Resumes from --checkpoint
when it holds a checkpoint of the same params. Logs params, the whole params file,
per-step losses and the trained model to MLflow (SQLite store at the repository root,
found through $DVC_ROOT under `dvc exp run`).
"""
from __future__ import annotations

import json
from pathlib import Path

from stages._common import load_params, parser, run


def main() -> None:
    from pipeline.config import describe
    ap = parser(__doc__, epilog="params keys (params.yaml):\n" + describe())
    ap.add_argument("--dataset-dir", type=Path, required=True, help="prepared dataset folder")
    ap.add_argument("--split-dir", type=Path, required=True, help="split folder (split.json, index.json)")
    ap.add_argument("--model", type=Path, required=True, help="trained model file to write")
    ap.add_argument("--checkpoint", type=Path, required=True, help="resumable checkpoint (kept across runs)")
    ap.add_argument("--curve", type=Path, required=True, help="training curve CSV to write")
    ap.add_argument("--labels", type=Path, default=None, help="read training labels from this folder (pseudo labels)")
    ap.add_argument("--run-name", default=None, help="MLflow run name (default: dataset-split-hash)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    args = ap.parse_args()
    p, params_text = load_params(args.params)

    import pandas as pd

    from pipeline.config import flatten, params_hash, to_dict
    from pipeline.engine.train import export_model, train
    from pipeline.io import atomic_path

    split = _read_json(args.split_dir / "split.json")
    index = _read_json(args.split_dir / "index.json")
    tracker = None
    if not args.no_mlflow:
        from pipeline import tracking
        tracker = tracking.RunTracker(tracking.store_root(),
                                      tracking.experiment_name(p.data.dataset, p.data.split))
        phash = params_hash(p)
        tracker.start(phash, args.run_name or f"{p.data.dataset}-split{p.data.split}-{phash[:8]}",
                      flatten(to_dict(p)), params_text,
                      tags={"stage": "train", "pseudo_labels": str(args.labels is not None).lower()})
    try:
        on_log = (lambda step, rec: tracker.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=step)) \
            if tracker else None
        model, out = train(p, args.dataset_dir, split, index, args.checkpoint, on_log=on_log,
                           label_root=args.labels, progress=not args.no_progress)
        export_model(model, p, split, args.model)
        with atomic_path(args.curve) as tmp:
            pd.DataFrame(out.history).to_csv(tmp, index=False)
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"'{path}' is missing: run the prepare stage first (dvc repro prepare)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"'{path}' is not valid JSON: {e}") from None


if __name__ == "__main__":
    run(main)
