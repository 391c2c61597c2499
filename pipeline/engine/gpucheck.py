"""Measurements of the GPU check (``python -m tools.gpu_check``) that the benchmark does not make:
the device's measured bf16 matmul rate (the MFU denominator one can trust), a short training
of the paper's model at the paper's resolution, projected to the paper's schedules, and how
many grid cells one device trains at once best (:func:`concurrent_training`).

Nothing here imports DVC or MLflow: the GPU machine has neither.
"""
from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path

import torch

from ..config import Params
from .device import resolve_device

# The paper's schedules (shared/reference/SIMFORMER.md, Optimisation): iterations at batch 8.
PAPER_SCHEDULES = {"ade20k": 160_000, "coco_stuff_10k": 60_000}
PAPER_SETUP = "released SimFormer training: 4 GPUs, one image pair per GPU (batch 8), detectron2, PyTorch 1.8"


def nvidia_smi() -> dict:
    """Name, driver and memory of each GPU as ``nvidia-smi`` reports them ({} without it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"nvidia-smi: {e}"}
    if out.returncode:
        return {"error": f"nvidia-smi exited {out.returncode}: {out.stderr.strip()[:200]}"}
    gpus = [dict(zip(("name", "driver", "memory", "compute_capability"), (x.strip() for x in line.split(","))))
            for line in out.stdout.strip().splitlines()]
    return {"gpus": gpus}


def matmul_rate(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16, repeats: int = 20) -> dict:
    """Achieved FLOP/s of an ``n x n`` by ``n x n`` matmul in ``dtype`` (best of ``repeats`` timed
    calls after two warm-up calls; CUDA events on a GPU, wall time on the CPU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = 2.0 * n ** 3
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            torch.cuda.synchronize(device)
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            torch.mm(a, b)
            seconds = time.perf_counter() - t0
        if i >= 2:
            times.append(seconds)
    best = min(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "best_seconds": best, "flops_per_s": flops / best,
            "tflops_per_s": flops / best / 1e12, "repeats": repeats}


def short_training(p: Params, dataset_dir: Path, split: dict, index: dict, workdir: Path,
                   log=lambda _m: None) -> dict:
    """Train ``p`` (the paper's model) for ``p.train.iterations`` steps on ``dataset_dir``; return the
    curve, whether the loss fell and stayed finite, seconds per iteration (median of the steps after
    the first tenth, logged at every step) and the hours the paper's schedules would take at that rate."""
    from .train import train
    device = resolve_device(p.train.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stamps: list[tuple[int, float]] = []

    def on_log(step: int, rec: dict) -> None:
        stamps.append((step, time.perf_counter()))
        if step % max(1, p.train.iterations // 10) == 0:
            log(f"paper training: step {step}/{p.train.iterations}, loss {rec['loss']:.3f}")

    t0 = time.perf_counter()
    _, out = train(p, dataset_dir, split, index, workdir / "paper_training.pt", on_log=on_log, progress=False)
    total = time.perf_counter() - t0
    losses = [float(r["loss"]) for r in out.history]
    finite = all(math.isfinite(x) for x in losses)
    k = max(1, len(losses) // 4)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    med = _median_step_seconds(stamps)
    sec_per_it = med if math.isfinite(med) else total / max(1, out.steps)
    hours = {name: its * sec_per_it / 3600 for name, its in PAPER_SCHEDULES.items()}
    return {"steps": out.steps, "batch_size": p.train.batch_size, "crop_size": p.data.crop_size,
            "device": str(device), "seconds_total": total, "seconds_per_iteration": sec_per_it,
            "images_per_s": p.train.batch_size / sec_per_it if sec_per_it > 0 else None,
            "loss_first_quarter": first, "loss_last_quarter": last, "loss_fell": finite and last < first,
            "finite": finite, "peak_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30
                                                 if device.type == "cuda" else None),
            "hours_for_paper_schedule": hours, "paper_setup": PAPER_SETUP,
            "curve": [{"step": r["step"], "loss": r["loss"]} for r in out.history]}


# ----------------------------------------------------------------------------- the grid on one device
CELL_STEPS = 3000           # the similarity verdict's cell length: cells per hour are quoted at it


def _concurrent_worker(rank: int, p: Params, dataset_dir: Path, split: dict, index: dict, workdir: Path,
                       threads: int, barrier, results) -> None:
    """One of ``N`` processes of :func:`concurrent_training`: train ``p`` and report its step times."""
    torch.set_num_threads(threads)
    from .train import train
    stamps: list[tuple[int, float]] = []
    barrier.wait()              # every process starts its training together
    t0 = time.perf_counter()
    _, out = train(p, dataset_dir, split, index, workdir / f"cell{rank}.pt",
                   on_log=lambda step, _rec: stamps.append((step, time.perf_counter())), progress=False)
    results.put((rank, time.perf_counter() - t0, stamps, out.steps))


def _median_step_seconds(stamps: list[tuple[int, float]]) -> float:
    skip = max(1, len(stamps) // 10)            # the first tenth: allocator / cuDNN warm-up
    gaps = sorted((t2 - t1) / (s2 - s1) for (s1, t1), (s2, t2) in zip(stamps[skip - 1:], stamps[skip:]) if s2 > s1)
    return gaps[len(gaps) // 2] if gaps else float("nan")


def concurrent_training(p: Params, dataset_dir: Path, split: dict, index: dict, workdir: Path,
                        procs: list[int], cores: int, log=lambda _m: None) -> dict:
    """How many grid cells one device should train at once: for each ``N`` in ``procs``, ``N`` spawned
    processes train ``p`` (a grid cell's params, ``p.train.iterations`` steps, logged every step) on
    the device at the same time, each with ``cores // N`` torch threads (at least 1), as the grid's
    ``ablation.workers`` processes do. Per ``N``: each process's median seconds per step (the first
    tenth of the steps left out), the aggregate steps per second of the device (the sum over the
    processes of 1 / their median), the speed-up over one process, the wall time, and the grid cells
    of :data:`CELL_STEPS` steps the device trains per hour at that rate. ``best`` is the ``N`` with the
    highest aggregate rate.

    Processes, not CUDA streams in one process: a cell is a whole training (its own model,
    optimizer, data order, RNG streams and checkpoint), which is what the grid's process pool
    already isolates, so a cell's bits do not depend on its neighbours; streams would need one
    Python thread per cell under the GIL, whose CPU-side work (the data loading, Hungarian
    matching and loss bookkeeping of a small model) is what leaves the GPU idle in the first place.
    """
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    out: dict = {"steps": p.train.iterations, "cores": cores, "cell_steps": CELL_STEPS, "by_procs": {}}
    for n in procs:
        threads = max(1, cores // n)
        log(f"grid on one device: {n} process{'es' if n > 1 else ''} x {p.train.iterations} steps, "
            f"{threads} thread{'s' if threads > 1 else ''} each")
        barrier, results = ctx.Barrier(n), ctx.Queue()
        t0 = time.perf_counter()
        workers = [ctx.Process(target=_concurrent_worker,
                               args=(r, p, dataset_dir, split, index, workdir / f"n{n}", threads, barrier, results))
                   for r in range(n)]
        for w in workers:
            w.start()
        got = []
        try:
            for _ in range(n):
                got.append(results.get(timeout=1800))
        finally:
            for w in workers:
                w.join(timeout=60)
                if w.is_alive():
                    w.terminate()
        bad = [w.exitcode for w in workers if w.exitcode]
        if bad or len(got) != n:
            raise RuntimeError(f"grid on one device: {n - len(got)} of {n} training processes gave no result "
                               f"(exit codes {bad})")
        med = [_median_step_seconds(stamps) for _, _, stamps, _ in sorted(got)]
        agg = sum(1.0 / m for m in med)
        out["by_procs"][str(n)] = {"threads_per_process": threads, "seconds_per_step": med,
                                   "aggregate_steps_per_s": agg, "wall_seconds": time.perf_counter() - t0,
                                   "cells_per_hour": agg * 3600.0 / CELL_STEPS}
    one = out["by_procs"].get("1")
    for rec in out["by_procs"].values():
        rec["speedup_vs_1"] = rec["aggregate_steps_per_s"] / one["aggregate_steps_per_s"] if one else None
    out["best"] = int(max(out["by_procs"], key=lambda k: out["by_procs"][k]["aggregate_steps_per_s"]))
    return out
