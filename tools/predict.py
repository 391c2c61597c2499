"""Run a trained SimFormer model on your own images.

For every image (any size; JPEG, PNG, BMP, TIFF, WebP) writes into --out:

  <name>_label.png    uint8 class ids at the image's size; 255 = no class (score below --min-score)
  <name>_overlay.png  the image with the predicted classes blended in, and a legend on the right
                      listing the classes present (colour, id, name, pixel share)
  <name>_shares.csv   class_id, name, pixels, share (largest first; 255 "none" last)
  summary.csv         one row per input: image, output name, size, status, classes, error

<name> is the image's file stem (-2, -3, ... appended when two inputs share one).

MODEL is one of
  data/train/model.pt          a checkpoint written by the train stage (or a folder holding one)
  runs:/<run_id>/model         an MLflow artifact of a run
  <run_id>                     an MLflow run (32 hex digits): its logged model is searched
  models:/<name>/<version>     a registered MLflow model
  models:/<name>@champion      the registered version with the best novel mIoU of its dataset and
                               split so far; @latest: the newest version (docs/MLFLOW_UI.md)
MLflow references are read from --tracking-uri, else $MLFLOW_TRACKING_URI, else this
repository's store (sqlite:///<repo>/mlflow.db, the one the stages write).

Images are resized as the model's evaluation resizes test images (data.test_short_edge /
data.test_max_edge of its params; --short-edge / --max-edge override, 0 = as is), batched by
padded size (a batch gives the same labels as one image at a time) and the class scores are
resampled to the original size (the outputs are at the image's own size).

Memory: the long edge is capped by default. When the model's params set no cap
(data.test_max_edge: 0, as the default params do) the cap is the training scale,
data.crop_size x data.scale_max (160 px for the default params): the model never saw larger
images, and the cost stays bounded. Uncapped (--max-edge 0), memory and time grow with the
pixels: an 8000 x 6000 JPEG took 12.9 GB peak RSS and 336 s with the default model, capped
1.7 GB and 46 s (2 shared CPU cores; python -m tools.predict_benchmark writes
reports/predict_memory.json). The outputs stay at the image's size either way. Capping was
chosen over tiling because a tile at full resolution still shows objects at a scale the model
never trained on, and tiling's time still grows with the pixels.

Class colours come from --classes (a prepared dataset's
classes.json), else the dataset's shipped table, else a generated palette.

A file that cannot be read as an image is named in one line on stderr; the other images are
still processed and the exit status is 1 at the end. Exit status 2: unusable model or options.

Example:
  python -m tools.predict --model data/train/model.pt --out predictions photos/ extra.jpg
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+", metavar="IMAGES", help="image files and/or folders (searched recursively)")
    ap.add_argument("--model", required=True, metavar="MODEL",
                    help="checkpoint file or folder, runs:/<run_id>/<path>, <run_id>, models:/<name>/<version> or "
                         "models:/<name>@champion")
    ap.add_argument("--out", required=True, type=Path, help="output folder (created; files in it are replaced)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="auto = CUDA when available, else CPU (default: auto)")
    ap.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: 4)")
    ap.add_argument("--short-edge", type=int, default=None,
                    help="resize the short edge to this before inference (default: the model's data.test_short_edge; "
                         "0 = keep)")
    ap.add_argument("--max-edge", type=int, default=None,
                    help="cap the long edge before inference (default: the model's data.test_max_edge, or when "
                         "that is 0 its training scale data.crop_size x data.scale_max; 0 = no cap: memory and "
                         "time grow with the pixels, see Memory above)")
    ap.add_argument("--min-score", type=float, default=0.0,
                    help="pixels whose best class score (sum over queries of class probability x mask "
                         "probability) is below this get 255 (default: 0, every pixel gets a class)")
    ap.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours (default: 0.5)")
    ap.add_argument("--classes", type=Path, default=None,
                    help="classes.json (or its folder) giving class names and colours")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for MLflow references")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from pipeline import predict as P
    from pipeline.engine.device import resolve_device
    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    paths, problems = P.collect_images(args.images)
    try:
        device = resolve_device(args.device, "--device")
        with P.model_download_dir() as tmp:
            ckpt = P.resolve_model(args.model, tmp, args.tracking_uri)
            predictor = P.load_predictor(ckpt, device, classes_json=args.classes, short_edge=args.short_edge,
                                         max_edge=args.max_edge)
    except (P.PredictError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for _, message in problems:
        print(f"error: {message}", file=sys.stderr)
    if predictor.max_edge == 0:
        print("warning: --max-edge 0: images run at full size; memory and time grow with the pixels (an 8000 x "
              "6000 photo took 12.9 GB and 336 s with the default model, capped 1.7 GB and 46 s)", file=sys.stderr)
    elif not args.no_progress or args.max_edge is None:
        print(f"long edge capped at {predictor.max_edge} px ({predictor.max_edge_from}); --max-edge overrides",
              file=sys.stderr)

    def on_error(path: Path, message: str) -> None:
        tqdm.write(f"error: {message}", file=sys.stderr)

    try:
        summary = P.predict_images(predictor, paths, args.out, batch_size=args.batch_size,
                                   min_score=args.min_score, alpha=args.alpha, progress=not args.no_progress,
                                   on_error=on_error)
    except P.PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok = int((summary["status"] == "ok").sum())
    failed = len(summary) - ok + len(problems)
    print(f"predicted {ok} image(s) with {args.model} on {device.type} into {args.out} "
          f"(summary: {args.out / P.SUMMARY_NAME})" + (f"; {failed} input(s) failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
