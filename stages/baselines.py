"""DVC stage `baselines`: the trivial baselines every model is shown beside.

On the prepared dataset and split: the majority class of the training labels everywhere, and
a per-pixel nearest-mean-colour classifier fitted on the training pixels of every class. Scored
on the test split with the models' metrics (see pipeline/engine/baselines.py); written as DVC
metrics, shown by the report next to the models.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.cli import add_inputs, load_params, parser, run
from pipeline.io import read_json

MAX_TRAIN_IMAGES = 2000     # fit on at most this many training images (evenly spaced): ADE20K has 20,210


def main() -> None:
    ap = parser(__doc__)
    add_inputs(ap, mlflow=False)
    ap.add_argument("--out", type=Path, required=True, help="baselines metrics JSON to write")
    args = ap.parse_args()
    load_params(args.params)            # validates the params file like every stage
    split = read_json(args.split_dir / "split.json")
    index = read_json(args.split_dir / "index.json")

    from pipeline.engine.baselines import trivial_baselines
    from pipeline.engine.metrics import SUMMARY_KEYS, metrics_to_json
    from pipeline.io import write_json
    out = trivial_baselines(args.dataset_dir, index, split, MAX_TRAIN_IMAGES, progress=not args.no_progress)
    write_json(args.out, {"majority": metrics_to_json({k: out["majority"][k] for k in SUMMARY_KEYS}),
                          "nearest_colour": metrics_to_json({k: out["nearest_colour"][k] for k in SUMMARY_KEYS}),
                          "fit": out["fit"]})
    nc = out["nearest_colour"]
    print(f"baselines: nearest mean colour mIoU {nc['mIoU']:.1f} (base {nc['mIoU_base']:.1f}, novel "
          f"{nc['mIoU_novel']:.1f}), pAcc {nc['pAcc']:.1f}; majority class pAcc {out['majority']['pAcc']:.1f}"
          f" -> {args.out}")


if __name__ == "__main__":
    run(main)
