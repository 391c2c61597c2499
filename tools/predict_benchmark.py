"""Peak memory and time of `python -m tools.predict` on one large synthetic photo, with and without
the default long-edge cap; the record goes to reports/predict_memory.json.

Each case runs `python -m tools.predict` as the only child of a small wrapper process, which
reports ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the predict process's peak resident
memory) and the wall time. The photo is a JPEG of smooth colour regions and noise (written once
into a temporary folder). The model: --model, else the repository's data/train/model.pt, else
(--untrained) the default params' architecture with random weights, which costs the same memory
and time as the trained one.

Examples:
  python -m tools.predict_benchmark                                   # 8000x6000: uncapped, then the default cap
  python -m tools.predict_benchmark --size 4000x3000 --case default --out /tmp/pm.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from pipeline.cli import run

ROOT = Path(__file__).resolve().parents[1]
# peak RSS in bytes and wall seconds of the one child the wrapper runs
WRAPPER = ("import json, resource, subprocess, sys, time\n"
           "t = time.perf_counter()\n"
           "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
           "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t,\n"
           "                  'peak_rss_bytes': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))\n")


def synthetic_photo(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A JPEG of ``width`` x ``height``: a few smooth colour regions with noise, like a photo."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    noise = rng.integers(-12, 13, (min(height, 512), min(width, 512), 3), dtype=np.int16)
    reps = (-(-height // noise.shape[0]), -(-width // noise.shape[1]), 1)
    img = np.clip(img.astype(np.int16) + np.tile(noise, reps)[:height, :width], 0, 255).astype(np.uint8)
    if not cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise OSError(f"cannot write {path}")
    return path


def measure(argv: list[str], env: dict | None = None) -> dict:
    """Run ``argv`` as the only child of a wrapper process: ``{"rc", "seconds", "peak_rss_bytes"}``."""
    out = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def untrained_model(path: Path, params_file: Path) -> Path:
    """The params file's model with random weights, exported like the train stage's model.pt."""
    import torch

    from pipeline.cli import load_params
    from pipeline.data.catalog import class_table
    from pipeline.engine.train import export_model
    from pipeline.model import build_model
    p, _ = load_params(params_file)
    names = [c["name"] for c in class_table(p.data.dataset)]
    torch.manual_seed(0)
    model = build_model(p.model, len(names))
    split = {"dataset": p.data.dataset, "split": p.data.split, "num_classes": len(names), "class_names": names,
             "base": list(range(len(names) - 1)), "novel": [len(names) - 1]}
    export_model(model, p, split, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.predict_benchmark", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model for tools.predict (default: data/train/model.pt)")
    ap.add_argument("--untrained", action="store_true",
                    help="use the --params model with random weights when there is no --model / data/train/model.pt")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file for --untrained")
    ap.add_argument("--size", default="8000x6000", help="photo width x height (default: 8000x6000)")
    ap.add_argument("--case", action="append", choices=("uncapped", "default"), default=None,
                    help="uncapped (--max-edge 0, predict's behaviour before the cap) and/or default (the cap); "
                         "repeatable (default: both)")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the predict process (0: unset)")
    ap.add_argument("--out", type=Path, default=Path("reports/predict_memory.json"), help="JSON record to write")
    ap.add_argument("--note", default="", help="a remark stored with the record (e.g. what else ran on the machine)")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    cases = args.case or ["uncapped", "default"]

    from pipeline.io import write_json
    with tempfile.TemporaryDirectory(prefix="simformer-predict-bench-") as tmp:
        tmp = Path(tmp)
        model = args.model or ("data/train/model.pt" if Path("data/train/model.pt").is_file() else None)
        if model is None:
            if not args.untrained:
                raise FileNotFoundError("no --model and no data/train/model.pt: train one (dvc repro) or pass "
                                        "--untrained to time the --params architecture with random weights")
            model = str(untrained_model(tmp / "untrained.pt", args.params))
        photo = synthetic_photo(tmp / f"photo_{width}x{height}.jpg", width, height)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        results = []
        for case in cases:
            argv = [sys.executable, "-m", "tools.predict", "--model", model, "--out", str(tmp / case),
                    "--no-progress", str(photo)] + (["--max-edge", "0"] if case == "uncapped" else [])
            r = measure(argv, env)
            summary = (tmp / case / "summary.csv")
            r.update(case=case, command="python -m tools.predict " + " ".join(argv[3:]).replace(str(tmp), "<tmp>"),
                     peak_rss_gb=round(r["peak_rss_bytes"] / 1e9, 2), seconds=round(r["seconds"], 1),
                     ok=r["rc"] == 0 and summary.is_file() and ",ok," in summary.read_text())
            print(f"{case}: peak RSS {r['peak_rss_gb']} GB, {r['seconds']} s, exit {r['rc']}", flush=True)
            results.append(r)
    record = {"image": f"{width}x{height} JPEG (synthetic photo)", "model": model if args.model else
              ("data/train/model.pt" if not model.endswith("untrained.pt") else f"untrained, {args.params}"),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": {
                  "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
              "method": "peak RSS: getrusage(RUSAGE_CHILDREN).ru_maxrss of a wrapper whose only child is the "
                        "predict process; seconds: wall time of that child (start-up and model load included)",
              **({"note": args.note} if args.note else {}), "cases": results}
    write_json(args.out, record)
    print(f"-> {args.out}")


if __name__ == "__main__":
    run(main)
