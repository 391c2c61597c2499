"""The GPU check: one command that measures what a GPU machine can tell about this pipeline, and
writes it all under one folder (not a DVC stage). Made for a short, metered GPU session: it
needs only torch, torchvision, numpy, scipy, OpenCV, PyYAML and pytest (no DVC, no MLflow, no
network), and finishes in about 5 minutes on an H200 with the defaults.

  python -m tools.gpu_check --out reports/gpu/<date>          # on the GPU machine
  python -m tools.gpu_check --out /tmp/gpu_smoke --device cpu --smoke   # a CPU dry run (seconds)

Steps (a failing step is recorded and the others still run; the exit status is 1 if any failed):

  environment     GPU name, memory, driver (nvidia-smi), torch / CUDA / cuDNN versions
  matmul          the measured dense bf16 matmul rate: the MFU denominator
  cuda tests      pytest -m cuda tests/test_cuda.py (bf16 vs fp32, matching, predict device vs
                  CPU, checkpoints across devices, exact resume, NCCL); its output kept
  benchmark       the paper model (ResNet-50, 100 queries, 6 decoder layers) at crops 512 and
                  640, batch 8 and 16: training images/s, step breakdown, peak memory, TFLOP/s,
                  MFU; the fast-path variants (fp32, bf16+channels_last+batched matching,
                  +point loss, +compile) side by side at crop 640, batch 8
  paper training  the paper preset trained --train-steps steps on synthetic images at its crop:
                  the loss falls, no NaN, seconds per iteration, and the hours the paper's 160k
                  (ADE20K) and 60k (COCO-Stuff-10K) iterations would take on this device
  grid            how many grid cells the device should train at once: 1, 2, 4, 8 processes
                  (--grid-procs) each train the params file's cell (the default small model)
                  --grid-steps steps at the same time; aggregate steps/s, speed-up, and the
                  3000-step cells per hour (the similarity verdict's cell length)

Files: results.json (everything but the benchmark record), benchmark.json, benchmark.md,
cuda_tests.txt, paper_training.json, grid.json, summary.md.
"""
from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from pipeline.cli import load_params, parser, run

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(512, 8), (512, 16), (640, 8), (640, 16)]      # (crop, batch) of the paper model's benchmark
VARIANTS_AT = (640, 8)                                   # the paper's COCO-Stuff setting: every fast path


def _step(results: dict, name: str, fn, log) -> object:
    t0 = time.perf_counter()
    log(f"== {name}")
    try:
        out = fn()
        results["steps"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1)}
        return out
    except Exception as e:  # noqa: BLE001 - one step's failure must not cost the other measurements
        results["steps"][name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 1),
                                  "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        log(f"!! {name} failed: {type(e).__name__}: {e}")
        return None


def paper_params(base_raw: dict, preset: dict, *, crop: int, batch: int, steps: int, device: str, workers: int):
    """The paper preset on synthetic data (split 1), from random weights (no ImageNet download on
    the GPU machine), ``steps`` iterations logged every step."""
    from pipeline.ablation import _merge
    from pipeline.config import build_params
    raw = _merge({k: v for k, v in base_raw.items() if k != "ablation"}, preset, "")
    raw = _merge(raw, {"data": {"dataset": "synthetic", "split": 1, "crop_size": crop, "prepare_workers": 1},
                       "model": {"pretrained": "none"},
                       "train": {"iterations": steps, "batch_size": batch, "checkpoint_interval": steps,
                                 "log_interval": 1, "diagnostics_interval": 0, "device": device, "workers": workers,
                                 "threads": 0, "nproc_per_node": 1, "nnodes": 1},
                       "eval": {"device": device}}, "")
    raw.pop("ablation", None)
    return build_params(raw)


def main(argv: list[str] | None = None) -> int:
    import yaml
    ap = parser(__doc__)
    ap.add_argument("--out", type=Path, required=True, help="folder to write (created; files are replaced)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="device (default auto)")
    ap.add_argument("--smoke", action="store_true",
                    help="toy sizes everywhere (the params file's small model instead of the paper's, crop 64, "
                         "batch 2, 2 training steps, the quick CUDA tests only): checks the command, measures nothing")
    ap.add_argument("--train-steps", type=int, default=300, help="paper training steps (default 300)")
    ap.add_argument("--bench-steps", type=int, default=20, help="timed benchmark steps per measurement (default 20)")
    ap.add_argument("--grid-procs", default="1,2,4,8",
                    help="grid step: comma list of how many cells train at once (default 1,2,4,8)")
    ap.add_argument("--grid-steps", type=int, default=150, help="grid step: training steps per cell (default 150)")
    ap.add_argument("--skip", default="", help="comma list of steps to skip: tests, benchmark, training, grid")
    ap.add_argument("--paper-preset", type=Path, default=ROOT / "presets/paper-coco_stuff_10k.yaml",
                    help="the paper preset (default: presets/paper-coco_stuff_10k.yaml)")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if bad := skip - {"tests", "benchmark", "training", "grid"}:
        raise ValueError(f"--skip: unknown step '{sorted(bad)[0]}'; allowed: tests, benchmark, training, grid")
    if args.train_steps < 2 or args.bench_steps < 1 or args.grid_steps < 2:
        raise ValueError("--train-steps and --grid-steps must be >= 2 and --bench-steps >= 1")
    try:
        grid_procs = sorted({int(x) for x in args.grid_procs.split(",") if x.strip()})
    except ValueError:
        grid_procs = []
    if not grid_procs or grid_procs[0] < 1:
        raise ValueError(f"--grid-procs: expected a comma list of positive integers, got '{args.grid_procs}'")
    p, _ = load_params(args.params)
    base_raw = yaml.safe_load(Path(args.params).read_text())
    try:
        preset = yaml.safe_load(args.paper_preset.read_text())
    except OSError as e:
        raise FileNotFoundError(f"--paper-preset '{args.paper_preset}' cannot be read: {e.strerror}") from None

    import torch

    from pipeline.engine import gpucheck
    from pipeline.engine.benchmark import Options, environment, make_dataset, run_benchmark
    from pipeline.engine.device import resolve_device
    from pipeline.io import write_json, write_text

    log = (lambda _m: None) if args.no_progress else (lambda m: print(m, file=sys.stderr, flush=True))
    device = resolve_device(args.device, "--device")
    smoke = args.smoke
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"schema": 1, "command": "python -m tools.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
                     "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "smoke": smoke,
                     "steps": {}}

    def env():
        e = environment(device)
        e.update(cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
                 nvidia_smi=gpucheck.nvidia_smi() if device.type == "cuda" else None)
        return e
    results["environment"] = _step(results, "environment", env, log)
    results["matmul"] = _step(results, "matmul", lambda: gpucheck.matmul_rate(
        device, 256 if smoke else 8192, torch.bfloat16, 3 if smoke else 20), log)

    if "tests" not in skip:
        def tests():
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rA",
                   str(ROOT / "tests" / "test_cuda.py")]
            env_ = dict(os.environ)
            if smoke or device.type != "cuda":
                env_["SIMFORMER_CUDA_TESTS_DEVICE"] = "cpu"
                cmd += ["-k", "tiny_params or matching"]
            r = subprocess.run(cmd, cwd=ROOT, env=env_, capture_output=True, text=True, timeout=900)
            write_text(args.out / "cuda_tests.txt", f"$ {' '.join(cmd)}\n\n{r.stdout}\n{r.stderr}")
            last = (r.stdout.strip().splitlines() or [""])[-1]
            if r.returncode not in (0, 5):
                raise RuntimeError(f"CUDA tests failed (exit {r.returncode}): {last}")
            return {"exit": r.returncode, "summary": last, "stand_in_cpu": "SIMFORMER_CUDA_TESTS_DEVICE" in env_}
        results["cuda_tests"] = _step(results, "cuda tests", tests, log)

    if "benchmark" not in skip:
        def bench():
            shapes = [(64, 2)] if smoke else SHAPES
            record = {"shapes": {}}
            for crop, batch in shapes:
                variants = ("fp32_per_image",) if smoke else (
                    ("fp32_per_image", "bf16+channels_last+batched", "+point_loss", "+compile")
                    if (crop, batch) == VARIANTS_AT else ())
                opts = Options(steps=1 if smoke else args.bench_steps, warmup=0 if smoke else 5,
                               configs=("default",) if smoke else ("paper",),
                               variants=variants, paper=preset, paper_batch=batch, paper_crop=crop,
                               paper_steps=1 if smoke else args.bench_steps, paper_warmup=0 if smoke else 5,
                               eval_images=1 if smoke else 8, loader_batches=1 if smoke else 10,
                               device=str(device), log=log)
                log(f"benchmark: crop {crop}, batch {batch}, variants {', '.join(variants) or 'none'}")
                record["shapes"][f"{crop}x{batch}"] = run_benchmark(p, opts)
            write_json(args.out / "benchmark.json", record)
            write_text(args.out / "benchmark.md", benchmark_markdown(record, results.get("matmul")))
            return {f: _shape_summary(r, results.get("matmul")) for f, r in record["shapes"].items()}
        results["benchmark"] = _step(results, "benchmark", bench, log)

    if "training" not in skip:
        def training():
            crop, batch = (64, 2) if smoke else (int(preset["data"]["crop_size"]), int(preset["train"]["batch_size"]))
            steps = 2 if smoke else args.train_steps
            pp = paper_params(base_raw, preset, crop=crop, batch=batch, steps=steps, device=str(device),
                              workers=0 if smoke else min(8, os.cpu_count() or 1))       # validates the preset
            if smoke:                # the params file's small model: the command is checked, nothing measured
                pp = paper_params(base_raw, {}, crop=crop, batch=batch, steps=steps, device=str(device), workers=0)
            with tempfile.TemporaryDirectory(prefix="simformer-gpucheck-") as tmp:
                log(f"paper training: generating {max(32, 4 * batch)} synthetic images of {crop} px")
                ds, split, index = make_dataset(Path(tmp), pp, max(32, 4 * batch), 2, crop)
                out = gpucheck.short_training(pp, ds, split, index, Path(tmp), log)
            write_json(args.out / "paper_training.json", out)
            return {k: v for k, v in out.items() if k != "curve"}
        results["paper_training"] = _step(results, "paper training", training, log)

    if "grid" not in skip:
        def grid():
            steps = 3 if smoke else args.grid_steps
            procs = [1, 2] if smoke else grid_procs
            cell = paper_params(base_raw, {}, crop=p.data.crop_size, batch=p.train.batch_size, steps=steps,
                                device=str(device), workers=0)      # the params file's cell, random init
            with tempfile.TemporaryDirectory(prefix="simformer-gpucheck-grid-") as tmp:
                ds, split, index = make_dataset(Path(tmp), cell, 32 if smoke else 160, 2,
                                                p.data.synthetic.image_size)
                out = gpucheck.concurrent_training(cell, ds, split, index, Path(tmp), procs, os.cpu_count() or 1, log)
            write_json(args.out / "grid.json", out)
            return out
        results["grid"] = _step(results, "grid", grid, log)

    write_json(args.out / "results.json", results)
    write_text(args.out / "summary.md", summary_markdown(results))
    failed = [k for k, v in results["steps"].items() if not v["ok"]]
    print(f"wrote {args.out}: " + ", ".join(f"{k} {'ok' if v['ok'] else 'FAILED'} ({v['seconds']:.0f} s)"
                                            for k, v in results["steps"].items()))
    return 1 if failed else 0


def _shape_summary(rec: dict, matmul: dict | None) -> dict:
    c = next(iter(rec["configs"].values()))
    peak = (matmul or {}).get("flops_per_s")
    achieved = c["flops"]["achieved_flops_per_s"]
    out = {"train_images_per_s": c["train"]["images_per_s"], "step_ms": c["train"]["step_s"] * 1e3,
           "peak_memory_mb": c["train"]["memory"]["peak_mb"], "achieved_tflops_per_s": achieved / 1e12,
           "mfu_vs_measured_matmul": achieved / peak if peak else None,
           "match_loss_share": c["breakdown"]["match_loss_share"], "variants": {}}
    for name, v in c["variants"].items():
        if v.get("skipped"):
            out["variants"][name] = {"skipped": v["skipped"]}
            continue
        out["variants"][name] = {"images_per_s": v["images_per_s"], "speedup": v.get("speedup_vs_fp32_per_image"),
                                 "peak_memory_mb": v["memory"]["peak_mb"],
                                 "achieved_tflops_per_s": v["achieved_flops_per_s"] / 1e12,
                                 "mfu_vs_measured_matmul": v["achieved_flops_per_s"] / peak if peak else None}
    return out


def _f(x, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def benchmark_markdown(record: dict, matmul: dict | None) -> str:
    lines = ["# Paper model benchmark (GPU check)", "",
             f"MFU denominator: measured bf16 matmul {_f((matmul or {}).get('tflops_per_s'), '{:.0f}')} TFLOP/s.", "",
             "| crop x batch | train img/s | step ms | peak MB | TFLOP/s | MFU | matching + losses |",
             "|---|---|---|---|---|---|---|"]
    for shape, rec in record["shapes"].items():
        s = _shape_summary(rec, matmul)
        lines.append(f"| {shape} | {s['train_images_per_s']:.2f} | {s['step_ms']:.0f} | {s['peak_memory_mb']:.0f} | "
                     f"{s['achieved_tflops_per_s']:.2f} | {_f(s['mfu_vs_measured_matmul'], '{:.1%}')} | "
                     f"{s['match_loss_share']:.0%} |")
    for shape, rec in record["shapes"].items():
        s = _shape_summary(rec, matmul)
        if not s["variants"]:
            continue
        lines += ["", f"## Fast paths at {shape}", "", "| variant | img/s | speed-up | peak MB | TFLOP/s | MFU |",
                  "|---|---|---|---|---|---|"]
        for name, v in s["variants"].items():
            if "skipped" in v:
                lines.append(f"| {name} | skipped: {v['skipped']} | | | | |")
                continue
            lines.append(f"| {name} | {v['images_per_s']:.2f} | {_f(v['speedup'], '{:.2f}x')} | "
                         f"{v['peak_memory_mb']:.0f} | {v['achieved_tflops_per_s']:.2f} | "
                         f"{_f(v['mfu_vs_measured_matmul'], '{:.1%}')} |")
    return "\n".join(lines) + "\n"


def summary_markdown(r: dict) -> str:
    env = r.get("environment") or {}
    lines = ["# GPU check" + (" (smoke: toy sizes, measures nothing)" if r["smoke"] else ""), "",
             f"`{r['command']}` on {r['created']}.", "",
             f"Device **{env.get('device_name', '?')}**, torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, "
             f"cuDNN {env.get('cudnn')}, driver {((env.get('nvidia_smi') or {}).get('gpus') or [{}])[0].get('driver')}, "
             f"memory {env.get('gpu_memory_gb')} GB; git {((env.get('git') or {}).get('commit') or '?')[:12]}.", "",
             "| step | result | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {'ok' if v['ok'] else 'FAILED: ' + v['error']} | {v['seconds']:.0f} |"
              for k, v in r["steps"].items()]
    if m := r.get("matmul"):
        lines += ["", f"Measured bf16 matmul ({m['n']}^3): {m['tflops_per_s']:.1f} TFLOP/s."]
    if t := r.get("cuda_tests"):
        lines += ["", f"CUDA tests: {t['summary']}" + (" (CPU stand-in)" if t["stand_in_cpu"] else "")]
    if b := r.get("benchmark"):
        lines += ["", "Benchmark (benchmark.md has the tables): " + "; ".join(
            f"{k}: {v['train_images_per_s']:.1f} img/s, {v['peak_memory_mb']:.0f} MB" for k, v in b.items())]
    if t := r.get("paper_training"):
        h = t["hours_for_paper_schedule"]
        lines += ["", f"Paper training: {t['steps']} steps, batch {t['batch_size']}, crop {t['crop_size']}: "
                      f"{t['seconds_per_iteration']:.3f} s/it; loss {t['loss_first_quarter']:.3f} -> "
                      f"{t['loss_last_quarter']:.3f} ({'falls' if t['loss_fell'] else 'DOES NOT FALL'}), "
                      f"{'finite' if t['finite'] else 'NON-FINITE'}; at this rate the paper's schedules take "
                      f"{h['ade20k']:.1f} h (ADE20K, 160k) and {h['coco_stuff_10k']:.1f} h (COCO-Stuff-10K, 60k) on "
                      f"this one device ({t['paper_setup']})."]
    if g := r.get("grid"):
        lines += ["", f"Grid on one device ({g['steps']} steps per cell, the params file's model): "
                      + "; ".join(f"{n} at once: {v['aggregate_steps_per_s']:.1f} steps/s "
                                  f"({_f(v['speedup_vs_1'], '{:.2f}x')}), {v['cells_per_hour']:.0f} cells/h"
                                  for n, v in g["by_procs"].items())
                      + f". Best: {g['best']} at once ({g['cell_steps']}-step cells per hour)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run(lambda: sys.exit(main()))
