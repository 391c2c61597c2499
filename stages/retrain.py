"""DVC stage `retrain` (optional, pseudo.enabled): pseudo-label the training set with the
trained model (base pixels from ground truth, novel pixels whose predicted class is in the
image's labels, the rest ignored), retrain fully supervised on those labels, and evaluate
that model like the first. With pseudo.enabled false it only records that it is off."""
from __future__ import annotations

import contextlib
from pathlib import Path

from pipeline.cli import add_init, add_inputs, load_params, parser, run


def main() -> None:
    ap = parser(__doc__)
    add_inputs(ap, model=True)
    add_init(ap)
    ap.add_argument("--out", type=Path, required=True, help="folder for pseudo labels, checkpoint and retrained model")
    ap.add_argument("--metrics", type=Path, required=True, help="metrics JSON of the retrained model")
    args = ap.parse_args()
    p, params_text = load_params(args.params)

    from pipeline.engine.metrics import SUMMARY_KEYS, metrics_to_json
    from pipeline.io import read_json, write_csv, write_json
    if not p.pseudo.enabled:       # no metrics at all: `dvc metrics show` lists only numbers that are metrics
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.metrics, {})
        print("pseudo-label retraining is off (pseudo.enabled: false)")
        return

    from pipeline.config import params_file_text
    from pipeline.engine.evaluate import evaluate_model, load_trained
    from pipeline.engine.pseudo import label_training_set, retrain_hash, retrain_params
    from pipeline.data.dataset import input_example
    from pipeline.engine.device import resolve_device
    from pipeline.engine.pretrain import load_init
    from pipeline.engine.train import export_model, train
    from pipeline.jobs import CoreShare
    from pipeline.tracking import log_trained_model, open_tracker, training_callbacks

    split = read_json(args.split_dir / "split.json")
    index = read_json(args.split_dir / "index.json")
    device = resolve_device(p.train.device)
    model, _, _ = load_trained(args.model, device)
    labels = args.out / "labels"
    stats = label_training_set(model, args.dataset_dir, index, split, labels, device, p.data.test_short_edge,
                               p.data.test_max_edge, progress=not args.no_progress)
    print(f"pseudo labels: {stats['novel_pixels']} novel pixels, "
          f"{stats['novel_precision']:.1f}% agree with ground truth")
    rp = retrain_params(p)
    phash = retrain_hash(p)
    tracker = None if args.no_mlflow else open_tracker(
        rp, params_file_text(rp, "the pseudo-label retraining"), {"stage": "retrain", "pseudo_labels": "true"},
        "retrain", phash=phash)
    # FINISHED on success, FAILED on an error, KILLED on Ctrl-C / SIGTERM (RunTracker.__exit__)
    with tracker or contextlib.nullcontext(), CoreShare(rp.train.threads) as cores:
        if tracker:     # counts are tags; the share of correct novel pixels is a metric
            tracker.set_tags({f"pseudo.{k}": v for k, v in stats.items() if k != "novel_precision"})
            tracker.log_metrics({"pseudo_novel_precision": stats["novel_precision"]})
            tracker.start_system_metrics()     # CPU, memory (GPU where there is one), as the train stage
        model, out = train(rp, args.dataset_dir, split, index, args.out / "checkpoint.pt",
                           **training_callbacks(tracker, cores, rp), label_root=labels, progress=not args.no_progress,
                           init=load_init(args.init, rp.model.pretrained))
        export_model(model, rp, split, args.out / "model.pt", out.history)
        write_csv(args.out / "curve.csv", out.history)
        metrics, _, _ = evaluate_model(model.eval(), args.dataset_dir, index, split, p, device,
                                       progress=not args.no_progress)
        # nested, so that DVC names its columns retrain.mIoU, ... apart from the main model's mIoU, ...
        write_json(args.metrics, metrics_to_json({"retrain": {**{k: metrics[k] for k in SUMMARY_KEYS},
                                                              "pseudo_novel_precision": stats["novel_precision"]}}))
        if tracker:
            tracker.log_metrics({k: metrics[k] for k in SUMMARY_KEYS})
        if tracker:
            log_trained_model(tracker, args.out / "model.pt", input_example(args.dataset_dir, index), cores,
                              register=False)
    print("retrained: " + "  ".join(f"{k} {metrics[k]:.2f}" for k in ("mIoU", "mIoU_base", "mIoU_novel", "hIoU")))


if __name__ == "__main__":
    run(main)
