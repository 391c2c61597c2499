"""DVC stage `evaluate`: semantic inference on the test split; confusion-matrix metrics
(mIoU, base / novel mIoU, hIoU, pixel accuracy, ...) to reports/metrics.json, per-class IoU
to a CSV, the confusion matrix as a .npy and as a CSV of (actual, predicted, count) pairs
(`dvc plots` draws both CSVs), and to the training run in MLflow (reopened: its status, times
and resume count stay as training left them): the metrics, linked to the run's logged model
and to the dataset; the class and pixel counts as tags; the confusion-matrix and qualitative
figures; and the registry alias `champion` moved to this model when its novel mIoU beats the
current champion's (docs/MLFLOW_UI.md)."""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.cli import add_inputs, load_params, parser, run


log = logging.getLogger("stages.evaluate")


def main() -> None:
    ap = parser(__doc__)
    add_inputs(ap, model=True)
    ap.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    ap.add_argument("--per-class", type=Path, required=True, help="per-class IoU CSV to write")
    ap.add_argument("--confusion", type=Path, required=True, help="confusion matrix .npy to write")
    ap.add_argument("--confusion-csv", type=Path, default=None,
                    help="the confusion matrix as actual,predicted,count,actual_id,predicted_id rows to write")
    args = ap.parse_args()
    p, params_text = load_params(args.params)

    from pipeline.engine.device import resolve_device
    from pipeline.engine.evaluate import evaluate_model, load_trained
    from pipeline.engine.metrics import confusion_pairs
    from pipeline.io import read_json, write_csv, write_eval_outputs, write_npy

    device = resolve_device(p.eval.device, "eval.device")
    model, trained_p, split = load_trained(args.model, device)
    index = read_json(args.split_dir / "index.json")
    summary, per_class, conf = evaluate_model(model, args.dataset_dir, index, split, p, device,
                                              progress=not args.no_progress)
    facts = write_eval_outputs(args.metrics, args.per_class, summary, per_class)
    write_npy(args.confusion, conf)
    if args.confusion_csv is not None:
        write_csv(args.confusion_csv, confusion_pairs(conf, split["class_names"]))
    if not args.no_mlflow:
        log_to_training_run(args, p, params_text, trained_p, model, split, index, summary, facts, conf)
    print("  ".join(f"{k} {summary[k]:.2f}" for k in ("mIoU", "mIoU_base", "mIoU_novel", "hIoU", "pAcc")))


def log_to_training_run(args, p, params_text, trained_p, model, split, index, summary, facts, conf) -> None:
    """Onto the training run (found by params hash; after a DVC run-cache hit there is none in
    this store, so one is created with the same params and tags)."""
    import tempfile

    import torch

    from pipeline.ablation import main_run_name
    from pipeline.cli import load_params_raw
    from pipeline.engine.metrics import SUMMARY_KEYS
    from pipeline.report.figures import confusion_figure
    from pipeline.report.qualitative import render_qualitative
    from pipeline.tracking import DatasetRef, log_evaluation, open_tracker

    grid = load_params_raw(args.params)[3]
    with open_tracker(trained_p, params_text, {"stage": "evaluate"}, main_run_name(grid, trained_p.base.seed),
                      include_finished=True) as tracker:
        log_evaluation(tracker, {k: summary[k] for k in SUMMARY_KEYS},
                       DatasetRef.of_folder(trained_p.data.dataset, args.dataset_dir))
        tracker.set_tags({f"eval.{k}": v for k, v in facts.items()})
        for path in (args.metrics, args.per_class, args.confusion_csv):
            if path is not None:
                tracker.log_artifact(path, "eval")
        try:        # figures for the run page only: a failure is warned about, like any MLflow trouble
            tracker.log_figure(confusion_figure(conf, split["class_names"], split["novel"]),
                               "eval/confusion_matrix.png")
            with tempfile.TemporaryDirectory(prefix="simformer-eval-") as tmp:
                png = render_qualitative(model.cpu(), args.dataset_dir, index, split, Path(tmp) / "qualitative.png",
                                         device=torch.device("cpu"))
                tracker.log_artifact(png, "eval")
        except (ValueError, OSError, RuntimeError) as e:
            log.warning("MLflow run %s: the evaluation figures were not logged: %s", tracker.run_id, e)
        got = tracker.promote(tracker.experiment, summary.get("mIoU_novel"))
    if got["version"] is not None:
        print(f"MLflow: {tracker.experiment} version {got['version']}"
              + (" is the champion (models:/" + f"{tracker.experiment}@champion)" if got["champion"]
                 else f" stays behind the champion (version {got['previous']}) on novel mIoU"))


if __name__ == "__main__":
    run(main)
