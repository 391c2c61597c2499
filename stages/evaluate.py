"""DVC stage `evaluate`: semantic inference on the test split; confusion-matrix metrics
(mIoU, base / novel mIoU, hIoU, pixel accuracy, ...) to reports/metrics.json, per-class IoU
to a CSV, and the metrics logged to the training run in MLflow (reopened: its status, times
and resume count stay as training left them; the class and pixel counts become tags)."""
from __future__ import annotations

from pathlib import Path

from pipeline.cli import add_inputs, load_params, parser, run


def main() -> None:
    ap = parser(__doc__)
    add_inputs(ap, model=True)
    ap.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    ap.add_argument("--per-class", type=Path, required=True, help="per-class IoU CSV to write")
    ap.add_argument("--confusion", type=Path, required=True, help="confusion matrix .npy to write")
    args = ap.parse_args()
    p, params_text = load_params(args.params)

    from pipeline.engine.device import resolve_device
    from pipeline.engine.evaluate import evaluate_model, load_trained
    from pipeline.engine.metrics import SUMMARY_KEYS
    from pipeline.io import read_json, write_eval_outputs, write_npy
    from pipeline.tracking import open_tracker

    device = resolve_device(p.eval.device, "eval.device")
    model, trained_p, split = load_trained(args.model, device)
    index = read_json(args.split_dir / "index.json")
    summary, per_class, conf = evaluate_model(model, args.dataset_dir, index, split, p, device,
                                              progress=not args.no_progress)
    facts = write_eval_outputs(args.metrics, args.per_class, summary, per_class)
    write_npy(args.confusion, conf)
    if not args.no_mlflow:
        # Logs onto the training run (found by params hash); after a DVC run-cache hit there is
        # none in this store, so one is created with the same params and tags.
        with open_tracker(trained_p, params_text, {"stage": "evaluate"}, "train", include_finished=True) as tracker:
            tracker.log_metrics({k: summary[k] for k in SUMMARY_KEYS})
            tracker.set_tags({f"eval.{k}": v for k, v in facts.items()})
            for path in (args.metrics, args.per_class):
                tracker.log_artifact(path, "eval")
    print("  ".join(f"{k} {summary[k]:.2f}" for k in ("mIoU", "mIoU_base", "mIoU_novel", "hIoU", "pAcc")))


if __name__ == "__main__":
    run(main)
