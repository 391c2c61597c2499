"""DVC stage `evaluate`: semantic inference on the test split; confusion-matrix metrics
(mIoU, base / novel mIoU, hIoU, pixel accuracy, ...) to reports/metrics.json, per-class IoU
to a CSV, and the metrics logged to the training run in MLflow."""
from __future__ import annotations

import json
from pathlib import Path

from stages._common import load_params, parser, run


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--model", type=Path, required=True, help="trained model file (train stage output)")
    ap.add_argument("--dataset-dir", type=Path, required=True, help="prepared dataset folder")
    ap.add_argument("--split-dir", type=Path, required=True, help="split folder (index.json)")
    ap.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    ap.add_argument("--per-class", type=Path, required=True, help="per-class IoU CSV to write")
    ap.add_argument("--confusion", type=Path, required=True, help="confusion matrix .npy to write")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    args = ap.parse_args()
    p, params_text = load_params(args.params)

    import numpy as np
    import pandas as pd

    from pipeline.engine.evaluate import evaluate, load_trained
    from pipeline.engine.metrics import compute_metrics, metrics_to_json
    from pipeline.engine.train import resolve_device
    from pipeline.io import atomic_path, write_json

    device = resolve_device(p.eval.device)
    model, trained_p, split = load_trained(args.model, device)
    index = json.loads((args.split_dir / "index.json").read_text())
    conf = evaluate(model, args.dataset_dir, index["test"], split["num_classes"], device,
                    p.data.test_short_edge, p.data.test_max_edge, p.eval.max_images, progress=not args.no_progress)
    metrics = compute_metrics(conf, split["base"], split["novel"], split["class_names"])
    per_class = metrics.pop("per_class")
    summary = {"dataset": split["dataset"], "split": split["split"], **metrics}
    write_json(args.metrics, metrics_to_json(summary))
    with atomic_path(args.per_class) as tmp:
        pd.DataFrame(per_class).to_csv(tmp, index=False)
    with atomic_path(args.confusion) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, conf)
    if not args.no_mlflow:
        from pipeline import tracking
        from pipeline.config import flatten, params_hash, to_dict
        tracker = tracking.RunTracker(tracking.store_root(),
                                      tracking.experiment_name(trained_p.data.dataset, trained_p.data.split))
        # Resumes the training run (found by params hash); after a DVC run-cache hit there is
        # none in this store, so one is created with the same params and tags.
        phash = params_hash(trained_p)
        tracker.start(phash, f"{trained_p.data.dataset}-split{trained_p.data.split}-{phash[:8]}",
                      flatten(to_dict(trained_p)), params_text, tags={"stage": "evaluate"}, resume=True,
                      include_finished=True)
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        for path in (args.metrics, args.per_class):
            tracker.log_artifact(path, "eval")
        tracker.finish("FINISHED")
    print("  ".join(f"{k} {metrics[k]:.2f}" for k in ("mIoU", "mIoU_base", "mIoU_novel", "hIoU", "pAcc")))


if __name__ == "__main__":
    run(main)
