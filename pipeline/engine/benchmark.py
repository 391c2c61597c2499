"""Throughput of the SimFormer pipeline on the current device (``python -m stages.benchmark``).

For each model configuration (``default``: the params file's model; ``paper``: MaskFormer
R50, crop 640, batch 8, 100 queries, 6 decoder layers, d=256) it measures, on synthetic
data generated into a temporary folder:

* training images/s over ``steps`` steps after ``warmup`` steps (data loading included, as
  in the real loop: the same :func:`~pipeline.engine.train.train_step`);
* a breakdown of one step: data wait, host-to-device copy + targets, forward, matching and
  losses (with matching alone), backward, optimizer step. On CUDA the breakdown comes from
  a second pass with ``torch.cuda.synchronize()`` between phases (the throughput pass has
  none); on the CPU every phase is synchronous and one pass gives both;
* peak memory: CUDA ``torch.cuda.max_memory_allocated``; CPU the peak resident set size
  sampled from ``/proc/self/statm`` during the run (and its growth over the RSS before);
* evaluation images/s (:func:`~pipeline.engine.evaluate.evaluate`, fp32, one image at a time);
* DataLoader images/s alone (the real training loader, no model) and its ratio to training;
* model FLOPs: the forward pass counted once with ``torch.utils.flop_counter.FlopCounterMode``
  (on the meta device), training FLOPs ~ 3 x forward (criterion not counted), achieved FLOP/s
  and, on a GPU of :data:`PEAK_FLOPS`, the model FLOP utilisation (MFU) against its dense
  bf16 peak;
* fast-path variants side by side (:data:`VARIANTS`); those that do not apply on the
  device are measured without the inapplicable switches or skipped, and the report says so.

Nothing here imports DVC or MLflow.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import Params, build_params, to_dict
from ..io import write_json, write_text
from .train import FastPath, build_train_loader, build_training, resolve_device, train_step

# Dense bf16 tensor-core peak (FLOP/s, no sparsity) from the vendors' datasheets. Matched
# against torch.cuda.get_device_name() by substring, first match wins (most specific first).
PEAK_FLOPS: list[tuple[str, float, str]] = [
    ("H100 PCIe", 756e12, "NVIDIA H100 PCIe, bf16 dense"),
    ("H100 NVL", 835e12, "NVIDIA H100 NVL, bf16 dense"),
    ("GH200", 989e12, "NVIDIA GH200 (H100 SXM class), bf16 dense"),
    ("H200", 989e12, "NVIDIA H200 (same tensor cores as H100 SXM), bf16 dense"),
    ("H100", 989e12, "NVIDIA H100 SXM, bf16 dense"),
    ("A100", 312e12, "NVIDIA A100, bf16 dense"),
]

POINT_LOSS_POINTS = 12544          # 112 x 112, Mask2Former's point count
MATCH_LOSS_TARGET = 0.20           # target: matching + losses <= 20% of a default-model CPU step
PHASES = ("data_wait", "transfer", "forward", "match_loss", "backward", "optimizer")
PHASE_HELP = {
    "data_wait": "waiting for the DataLoader (the whole loading when train.workers = 0)",
    "transfer": "host-to-device copy and weak-shot targets",
    "forward": "model forward (autocast when amp)",
    "match_loss": "Hungarian matching and every loss (all decoder layers, SimNet)",
    "backward": "backward pass",
    "optimizer": "gradient clipping, AdamW step, lr schedule",
}

# The paper's model and recipe (SIMFORMER.md; COCO-Stuff-10K: crop 640, pp_weight 0.1).
PAPER_MODEL = {"backbone": "resnet50", "pretrained": "none", "freeze_bn": True, "hidden_dim": 256,
               "num_queries": 100, "nheads": 8, "dec_layers": 6, "dim_feedforward": 2048, "dropout": 0.1,
               "conv_dim": 256, "mask_dim": 256, "gn_groups": 32}
PAPER_LOSS = {"sim_points": 100, "sim_base_points": 80, "pp_points": 100, "pp_weight": 0.1, "comp_weight": 0.15}
PAPER_TRAIN = {"lr": 1e-4, "backbone_lr_mult": 0.1}


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    switches: dict                 # train.* fast-path keys
    per_image_matching: bool
    mask_points: int
    cuda_only_compile: bool = False


_ALL_OFF = {"amp": False, "channels_last": False, "tf32": False, "fused_adamw": False, "compile": False}
_FAST = {"amp": True, "channels_last": True, "tf32": True, "fused_adamw": True, "compile": False}
VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("fp32_per_image", "baseline: fp32 (no amp, no TF32), contiguous NCHW, plain AdamW, "
            "matcher called once per image, dense MaskLoss", _ALL_OFF, True, 0),
    Variant("bf16+channels_last+batched", "bf16 autocast, channels_last, TF32, fused AdamW, batched matching "
            "(one cost pass per layer), dense MaskLoss", _FAST, False, 0),
    Variant("+point_loss", f"as above + point-sampled MaskLoss (loss.mask_points={POINT_LOSS_POINTS})",
            _FAST, False, POINT_LOSS_POINTS),
    Variant("+compile", "as above + torch.compile(model)", {**_FAST, "compile": True}, False, POINT_LOSS_POINTS,
            cuda_only_compile=True),
)}


@dataclass
class Options:
    steps: int = 20
    warmup: int = 5
    configs: tuple[str, ...] = ("default", "paper")
    variants: tuple[str, ...] = tuple(VARIANTS)
    variant_configs: tuple[str, ...] | None = None     # None = every config in ``configs``
    paper_batch: int = 8
    paper_crop: int = 640
    paper_steps: int | None = None                     # None: steps on CUDA, min(steps, 2) on the CPU
    paper_warmup: int | None = None                    # None: warmup on CUDA, min(warmup, 1) on the CPU
    eval_images: int = 20
    loader_batches: int = 20
    device: str = "auto"
    compile_on_cpu: bool = False
    workdir: str | None = None
    progress: bool = False
    log: Callable[[str], None] | None = None


# ----------------------------------------------------------------------------- small tools
def _sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


class _RssSampler:
    """Peak resident set size while the block runs (a thread polls ``/proc/self/statm``)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.before, self.peak = interval, None, None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        self.before = _rss_bytes()
        self.peak = self.before
        self._maxrss_before = _maxrss_bytes()
        if self.before is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            r = _rss_bytes()
            if r is not None and r > self.peak:
                self.peak = r

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            r = _rss_bytes()
            if r is not None and r > self.peak:
                self.peak = r
        else:                                  # no /proc: process high-water mark (ru_maxrss)
            self.peak = _maxrss_bytes()
            self.before = self._maxrss_before
        return False


class PhaseTimer:
    """Accumulates wall time per phase; ``sync`` runs before every reading (CUDA)."""

    def __init__(self, sync: Callable[[], None]):
        self.sync, self.totals, self._t = sync, {k: 0.0 for k in PHASES}, 0.0

    def start(self) -> None:
        self.sync()
        self._t = time.perf_counter()

    def __call__(self, phase: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self._t
        self._t = now


class PerImageMatcher(nn.Module):
    """The baseline: the batched matcher called once per image (a cost pass and a transfer each)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, outputs: dict, targets: list[dict], *args, **kwargs):
        b = outputs["pred_logits"].shape[0]
        out = []
        for i in range(b):
            one = {k: (v[i:i + 1] if torch.is_tensor(v) and v.dim() and v.shape[0] == b else v)
                   for k, v in outputs.items() if k != "aux_outputs"}
            out.extend(self.inner(one, [targets[i]], *args, **kwargs))
        return out


class TimedMatcher(nn.Module):
    """Wraps the matcher and adds up the time spent in it (synchronised when ``sync_on``)."""

    def __init__(self, inner: nn.Module, sync: Callable[[], None]):
        super().__init__()
        self.inner, self.sync = inner, sync
        self.seconds, self.calls, self.sync_on = 0.0, 0, False

    def forward(self, *args, **kwargs):
        if self.sync_on:
            self.sync()
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        if self.sync_on:
            self.sync()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


# ----------------------------------------------------------------------------- environment
def git_commit(root: str | Path | None = None) -> dict:
    """Commit and dirtiness of the working tree, read-only (no index refresh); 'unknown' without git."""
    root = Path(root or Path(__file__).resolve().parents[2])
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, env=env)
        if commit.returncode != 0:
            raise OSError(commit.stderr.strip())
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=20, env=env)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": os.environ.get("GIT_COMMIT", "unknown"), "dirty": None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages: other processes on a shared machine slow every figure."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def device_peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s, source) for a GPU listed in :data:`PEAK_FLOPS`; None otherwise."""
    if device.type != "cuda":
        return None, "CPU: no peak table; achieved GFLOP/s only"
    name = torch.cuda.get_device_name(device)
    for key, flops, source in PEAK_FLOPS:
        if key in name:
            return flops, source
    return None, f"'{name}' is not in the peak table; achieved FLOP/s only"


def environment(device: torch.device) -> dict:
    import cv2
    import numpy as np
    import torchvision
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "numpy": np.__version__, "opencv": cv2.__version__, "platform": platform.platform(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "device": device.type, "device_name": _cpu_model(),
        "load_average": _load_average(),
        "git": git_commit(),
    }
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        env.update({"device_name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version(), "gpu_memory_gb": round(prop.total_memory / 2**30, 1),
                    "gpu_count": torch.cuda.device_count()})
    return env


# ----------------------------------------------------------------------------- configs and data
def config_params(p: Params, name: str, opts: Options) -> tuple[Params, str]:
    """The params of a benchmark config: ``default`` (the file's, with untrained weights) or ``paper``."""
    raw = to_dict(p)
    raw["model"]["pretrained"] = "none"       # speed and FLOPs do not depend on the initial weights
    if name == "default":
        return build_params(raw), "the params file's model and training settings (model.pretrained: none)"
    if name != "paper":
        raise ValueError(f"unknown benchmark config '{name}'; allowed: default, paper")
    raw["model"].update(PAPER_MODEL)
    raw["loss"].update(PAPER_LOSS)
    raw["train"].update(PAPER_TRAIN)
    raw["train"]["batch_size"] = opts.paper_batch
    raw["data"]["crop_size"] = opts.paper_crop
    raw["train"]["pair_sampling"] = raw["train"]["pair_sampling"] and opts.paper_batch % 2 == 0
    desc = (f"paper: MaskFormer R50 (frozen BN), d=256, 100 queries, 6 decoder layers, FFN 2048, FPN 256, "
            f"crop {opts.paper_crop}, batch {opts.paper_batch}, SimLoss/DistLoss 100 points")
    if (opts.paper_batch, opts.paper_crop) != (8, 640):
        desc += " (reduced from the paper's crop 640 / batch 8)"
    return build_params(raw), desc


def make_dataset(root: Path, p: Params, num_train: int, num_test: int, image_size: int) -> tuple[Path, dict, dict]:
    """Synthetic dataset + split 1 into ``root`` (prepared layout, split.json, index.json contents)."""
    from ..config import SyntheticConfig
    from ..data.splits import build_split
    from ..data.synthetic import generate_dataset
    ds = root / f"synthetic_{image_size}_{num_train}_{num_test}"
    if not (ds / "classes.json").is_file():
        generate_dataset(ds, SyntheticConfig(num_train=num_train, num_test=num_test, image_size=image_size),
                         p.base.seed, progress=False)
    split, index = build_split(ds, "synthetic", 1, workers=1, progress=False)
    return ds, split, index


# ----------------------------------------------------------------------------- measurements
def count_forward_flops(p: Params, num_classes: int, size: int) -> tuple[float, str]:
    """Forward FLOPs of one ``size`` x ``size`` image (FlopCounterMode: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..model import build_model
    try:
        with torch.device("meta"):
            model = build_model(p.model, num_classes)
            x = torch.zeros(1, 3, size, size)
            with FlopCounterMode(display=False) as fc:
                model(x)
        return float(fc.get_total_flops()), "meta"
    except Exception:                          # an op without a meta kernel: count on the CPU
        torch.manual_seed(0)
        model = build_model(p.model, num_classes)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(torch.zeros(1, 3, size, size))
        return float(fc.get_total_flops()), "cpu"


def measure_training(p: Params, variant_fast: FastPath, per_image: bool, dataset_dir: Path, split: dict,
                     index: dict, device: torch.device, steps: int, warmup: int,
                     keep_model: bool = False) -> dict:
    """Train ``warmup + steps`` steps (plus ``steps`` synchronised ones on CUDA); returns figures."""
    sync = _sync_fn(device)
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base_mem = torch.cuda.memory_allocated(device) if cuda else 0
    total = warmup + steps * (2 if cuda else 1)
    loader = build_train_loader(p, dataset_dir, index, 0, total, device)
    with _RssSampler() as rss:
        tr = build_training(p, split, device, variant_fast)
        matcher = tr.state.criterion.matcher
        timed = TimedMatcher(PerImageMatcher(matcher) if per_image else matcher, sync)
        tr.state.criterion.matcher = timed
        model = tr.state.model
        model.train()
        tr.state.criterion.train()
        it = iter(loader)

        def run(n: int, mark: PhaseTimer | None) -> tuple[float, int]:
            sync()
            t0 = time.perf_counter()
            images = 0
            for _ in range(n):
                if mark is not None:
                    mark.start()
                batch = next(it)
                if mark is not None:
                    mark("data_wait")
                train_step(tr, batch, mark=mark)
                images += batch["image"].shape[0]
            sync()
            return time.perf_counter() - t0, images

        warmup_s, _ = run(warmup, None)
        if cuda:        # throughput without phase syncs, then the synchronised breakdown pass
            seconds, images = run(steps, None)
            timed.seconds, timed.calls, timed.sync_on = 0.0, 0, True
            timer = PhaseTimer(sync)
            run(steps, timer)
        else:           # every phase is synchronous on the CPU: one pass gives both
            timed.seconds, timed.calls = 0.0, 0
            timer = PhaseTimer(sync)
            seconds, images = run(steps, timer)
    del it, loader
    per_step = {k: v / steps for k, v in timer.totals.items()}
    step_total = sum(per_step.values())
    share = {k: (v / step_total if step_total > 0 else 0.0) for k, v in per_step.items()}
    matching = timed.seconds / steps
    res = {
        "images_per_s": images / seconds if seconds > 0 else 0.0,
        "step_s": seconds / steps,
        "steps": steps, "warmup": warmup, "images": images, "seconds": seconds, "warmup_s": warmup_s,
        "fast_path": dataclasses.asdict(variant_fast), "per_image_matching": per_image,
        "mask_points": p.loss.mask_points,
        "breakdown": {
            "synchronized": cuda, "seconds_per_step": per_step, "step_s": step_total, "share": share,
            "matching_s_per_step": matching,
            "matching_share": matching / step_total if step_total > 0 else 0.0,
            "losses_without_matching_share": max(0.0, share["match_loss"] - matching / step_total)
            if step_total > 0 else 0.0,
            "match_loss_share": share["match_loss"],
            "matcher_calls_per_step": timed.calls / steps,
        },
    }
    if cuda:
        res["memory"] = {"kind": "cuda max_memory_allocated", "peak_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                         "growth_mb": (torch.cuda.max_memory_allocated(device) - base_mem) / 2**20}
    else:
        res["memory"] = {"kind": "cpu peak RSS sampled during the run" if rss.before is not None
                         else "cpu ru_maxrss (process high-water mark)",
                         "peak_mb": (rss.peak or 0) / 2**20,
                         "growth_mb": max(0, (rss.peak or 0) - (rss.before or 0)) / 2**20,
                         "process_maxrss_mb": _maxrss_bytes() / 2**20}
    if keep_model:
        res["_model"] = model
    return res


def measure_loader(p: Params, dataset_dir: Path, index: dict, device: torch.device, batches: int) -> dict:
    """The training DataLoader alone (decode, augment, collate, pin) over ``batches`` batches."""
    loader = build_train_loader(p, dataset_dir, index, 0, batches + 1, device)
    it = iter(loader)
    next(it)                                   # worker start-up stays out of the figure
    t0 = time.perf_counter()
    images = 0
    for batch in it:
        images += batch["image"].shape[0]
    seconds = time.perf_counter() - t0
    del it, loader
    return {"images_per_s": images / seconds if seconds > 0 else 0.0, "images": images, "batches": batches,
            "seconds": seconds, "workers": p.train.workers, "pin_memory": device.type == "cuda"}


def measure_eval(model: nn.Module, dataset_dir: Path, index: dict, num_classes: int, device: torch.device,
                 images: int, short_edge: int) -> dict:
    """The evaluate stage's inference (fp32, one image at a time, confusion matrix) on ``images`` images."""
    from .evaluate import evaluate
    sync = _sync_fn(device)
    model.eval()
    entries = index["test"]
    evaluate(model, dataset_dir, entries, num_classes, device, short_edge, 0, max_images=1, progress=False)
    sync()
    n = min(images, len(entries))
    t0 = time.perf_counter()
    evaluate(model, dataset_dir, entries, num_classes, device, short_edge, 0, max_images=n, progress=False)
    sync()
    seconds = time.perf_counter() - t0
    return {"images_per_s": n / seconds if seconds > 0 else 0.0, "images": n, "seconds": seconds,
            "short_edge": short_edge, "precision": "fp32"}


def _variant_params(p: Params, v: Variant) -> Params:
    raw = to_dict(p)
    raw["train"].update(v.switches)
    raw["loss"]["mask_points"] = v.mask_points
    return build_params(raw)


def _not_applied(v_params: Params, device: torch.device) -> list[str]:
    return FastPath.not_applied(v_params.train, device)


def _flops_block(fwd_flops: float, images_per_s: float, peak: float | None) -> dict:
    train_flops = 3 * fwd_flops
    achieved = train_flops * images_per_s
    return {"achieved_flops_per_s": achieved, "achieved_gflops_per_s": achieved / 1e9,
            "mfu": achieved / peak if peak else None}


def _budget(name: str, opts: Options, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    if name == "paper" and not cuda:
        steps = opts.paper_steps if opts.paper_steps is not None else min(opts.steps, 2)
        warmup = opts.paper_warmup if opts.paper_warmup is not None else min(opts.warmup, 1)
        return {"steps": max(1, steps), "warmup": max(0, warmup), "eval_images": min(opts.eval_images, 4),
                "loader_batches": min(opts.loader_batches, 4), "reduced": True}
    steps = opts.paper_steps if (name == "paper" and opts.paper_steps is not None) else opts.steps
    warmup = opts.paper_warmup if (name == "paper" and opts.paper_warmup is not None) else opts.warmup
    return {"steps": max(1, steps), "warmup": max(0, warmup), "eval_images": opts.eval_images,
            "loader_batches": opts.loader_batches, "reduced": False}


def benchmark_config(name: str, p: Params, opts: Options, device: torch.device, root: Path, peak: float | None,
                     log: Callable[[str], None]) -> dict:
    cp, desc = config_params(p, name, opts)
    budget = _budget(name, opts, device)
    crop, batch = cp.data.crop_size, cp.train.batch_size
    image_size = cp.data.synthetic.image_size if name == "default" else min(max(crop, 32), 1024)
    num_train = max(16, 2 * batch)
    num_test = max(2, budget["eval_images"])
    log(f"[{name}] generating {num_train}+{num_test} synthetic images of {image_size}px")
    ds, split, index = make_dataset(root, cp, num_train, num_test, image_size)
    num_classes = split["num_classes"]
    fwd_flops, flop_device = count_forward_flops(cp, num_classes, crop)
    out: dict[str, Any] = {
        "description": desc, "model": to_dict(cp.model), "crop_size": crop, "batch_size": batch,
        "num_classes": num_classes, "loss": {k: getattr(cp.loss, k) for k in
                                             ("mask_points", "sim_points", "sim_base_points", "pp_points",
                                              "sim_weight", "pp_weight", "comp_weight", "deep_supervision")},
        "budget": budget, "dataset": {"image_size": image_size, "num_train": num_train, "num_test": num_test},
        "flops": {"forward_per_image": fwd_flops, "train_per_image": 3 * fwd_flops, "counted_on": flop_device,
                  "note": "model forward only (FlopCounterMode); training ~ 3 x forward; criterion not counted"},
    }
    notes = []
    if budget["reduced"]:
        notes.append(f"CPU: reduced budget ({budget['steps']} steps after {budget['warmup']} warm-up, "
                     f"{budget['eval_images']} eval images, {budget['loader_batches']} loader batches)")

    # main measurement: the config's own train.* settings, resolved for the device
    fast = FastPath.resolve(cp.train, device)
    if fast.compile and device.type != "cuda" and not opts.compile_on_cpu:
        fast = dataclasses.replace(fast, compile=False)
        notes.append("train.compile is on but not measured on the CPU (use --compile-on-cpu)")
    skipped = FastPath.not_applied(cp.train, device)
    if skipped:
        notes.append(f"CUDA-only switches not applied on {device.type}: {', '.join(skipped)}")
    log(f"[{name}] training {budget['warmup']}+{budget['steps']} steps, batch {batch}, crop {crop}")
    main = measure_training(cp, fast, False, ds, split, index, device, budget["steps"], budget["warmup"],
                            keep_model=True)
    model = main.pop("_model")
    main["not_applied"] = skipped
    out["train"] = {k: v for k, v in main.items() if k != "breakdown"}
    bd = main["breakdown"]
    bd["target_match_loss_share_max"] = MATCH_LOSS_TARGET
    bd["meets_target"] = bd["match_loss_share"] <= MATCH_LOSS_TARGET
    bd["phase_help"] = PHASE_HELP
    out["breakdown"] = bd
    out["flops"].update(_flops_block(fwd_flops, main["images_per_s"], peak))
    log(f"[{name}] evaluation on {budget['eval_images']} images")
    out["eval"] = measure_eval(model, ds, index, num_classes, device, budget["eval_images"], crop)
    del model
    log(f"[{name}] data loader alone, {budget['loader_batches']} batches")
    out["loader"] = measure_loader(cp, ds, index, device, budget["loader_batches"])
    out["loader"]["loader_over_train"] = (out["loader"]["images_per_s"] / main["images_per_s"]
                                          if main["images_per_s"] > 0 else None)

    # fast-path variants, side by side
    vconfigs = opts.variant_configs if opts.variant_configs is not None else opts.configs
    variants: dict[str, dict] = {}
    if name in vconfigs:
        cache: dict[tuple, dict] = {}
        main_key = (fast, False, cp.loss.mask_points)
        cache[main_key] = main
        for vname in opts.variants:
            v = VARIANTS[vname]
            vp = _variant_params(cp, v)
            vfast = FastPath.resolve(vp.train, device)
            na = _not_applied(vp, device)
            rec: dict[str, Any] = {"description": v.description, "not_applied": na, "skipped": None}
            if vfast.compile and device.type != "cuda" and not opts.compile_on_cpu:
                rec["skipped"] = ("torch.compile is not measured on the CPU: compiling takes minutes on a few "
                                  "cores and a short run cannot amortise it (--compile-on-cpu forces it)")
                variants[vname] = rec
                continue
            key = (vfast, v.per_image_matching, vp.loss.mask_points)
            if key in cache:
                r = cache[key]
                rec["same_as"] = "main" if r is main else next(n for n, x in variants.items() if x.get("_res") is r)
            else:
                log(f"[{name}] variant {vname}")
                wu = max(budget["warmup"], 2) if vfast.compile else budget["warmup"]
                r = measure_training(vp, vfast, v.per_image_matching, ds, split, index, device, budget["steps"], wu)
                cache[key] = r
            rec["_res"] = r
            rec.update({k: r[k] for k in ("images_per_s", "step_s", "steps", "warmup", "warmup_s", "fast_path",
                                          "per_image_matching", "mask_points", "memory")})
            rec["breakdown"] = {k: r["breakdown"][k] for k in ("seconds_per_step", "share", "match_loss_share",
                                                             "matching_share", "matching_s_per_step")}
            rec.update(_flops_block(fwd_flops, r["images_per_s"], peak))
            variants[vname] = rec
        base = variants.get("fp32_per_image", {}).get("images_per_s")
        for rec in variants.values():
            rec.pop("_res", None)
            if base and rec.get("images_per_s"):
                rec["speedup_vs_fp32_per_image"] = rec["images_per_s"] / base
    out["variants"] = variants
    out["notes"] = notes
    return out


def run_benchmark(p: Params, opts: Options) -> dict:
    """Every measurement of :mod:`pipeline.engine.benchmark` for ``opts.configs``; returns the record."""
    log = opts.log or (lambda _m: None)
    device = resolve_device(opts.device)
    if p.train.threads:
        torch.set_num_threads(p.train.threads)
    for name in opts.variants:
        if name not in VARIANTS:
            raise ValueError(f"unknown benchmark variant '{name}'; allowed: {', '.join(VARIANTS)}")
    peak, peak_source = device_peak_flops(device)
    record: dict[str, Any] = {
        "schema": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "settings": {"steps": opts.steps, "warmup": opts.warmup, "configs": list(opts.configs),
                     "variants": list(opts.variants),
                     "variant_configs": list(opts.variant_configs if opts.variant_configs is not None
                                             else opts.configs),
                     "paper_batch": opts.paper_batch, "paper_crop": opts.paper_crop,
                     "eval_images": opts.eval_images, "loader_batches": opts.loader_batches,
                     "train": to_dict(p.train)},
        "peak_flops_table": {key: {"flops_per_s": f, "source": s} for key, f, s in PEAK_FLOPS},
        "device_peak_flops": peak, "device_peak_source": peak_source,
        "configs": {},
    }
    with tempfile.TemporaryDirectory(prefix="simformer-bench-", dir=opts.workdir) as tmp:
        for name in opts.configs:
            record["configs"][name] = benchmark_config(name, p, opts, device, Path(tmp), peak, log)
    record["environment"]["load_average_end"] = _load_average()
    return record


# ----------------------------------------------------------------------------- output
def _f(x, fmt=".1f", none="n/a") -> str:
    return none if x is None else format(x, fmt)


def to_markdown(r: dict) -> str:
    env = r["environment"]
    git = env.get("git", {})
    lines = [
        "# SimFormer pipeline benchmark", "",
        f"Device **{env['device_name']}** ({env['device']}), torch {env['torch']}, torchvision "
        f"{env['torchvision']}, Python {env['python']}, {env['torch_threads']} torch threads, "
        f"{env['cpu_count']} CPUs ({env['cpu']}); git {git.get('commit', 'unknown')[:12]}"
        f"{' (dirty)' if git.get('dirty') else ''}; {r['created']}."
        + (f" Load average (1 min) {env['load_average'][0]:.1f} at the start, "
           f"{env['load_average_end'][0]:.1f} at the end: other processes share these CPUs."
           if env.get("load_average") and env.get("load_average_end") and env["device"] == "cpu" else ""), "",
        f"Peak for MFU: {r['device_peak_source']}"
        + (f" = {r['device_peak_flops'] / 1e12:.0f} TFLOP/s." if r["device_peak_flops"] else "."),
        "Peak table (dense bf16): " + "; ".join(f"{k} {v['flops_per_s'] / 1e12:.0f} TFLOP/s"
                                                 for k, v in r["peak_flops_table"].items()) + ".", "",
        "## Summary", "",
        "| config | crop | batch | steps | train img/s | step ms | eval img/s | loader img/s | loader/train "
        "| peak memory MB | fwd GFLOP/img | achieved GFLOP/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in r["configs"].items():
        t, fl = c["train"], c["flops"]
        lines.append(f"| {name} | {c['crop_size']} | {c['batch_size']} | {t['steps']} | {t['images_per_s']:.2f} | "
                     f"{t['step_s'] * 1e3:.0f} | {c['eval']['images_per_s']:.2f} | "
                     f"{c['loader']['images_per_s']:.1f} | {_f(c['loader']['loader_over_train'], '.2f')} | "
                     f"{t['memory']['peak_mb']:.0f} | {fl['forward_per_image'] / 1e9:.2f} | "
                     f"{fl['achieved_gflops_per_s']:.1f} | {_f(fl['mfu'] and fl['mfu'] * 100, '.1f')}"
                     f"{'%' if fl['mfu'] else ''} |")
    lines += ["", "Training images/s include data loading (the real loop); loader/train > 1 means the "
              "DataLoader alone is faster than training. Evaluation: the evaluate stage's fp32 inference, "
              "one image at a time. Memory: " + "; ".join(sorted({c["train"]["memory"]["kind"]
                                                                  for c in r["configs"].values()})) + ".", ""]
    lines += ["## One training step", "",
              "| config | " + " | ".join(PHASES) + " | step ms | matching | matching + losses |",
              "|---|" + "---|" * (len(PHASES) + 3)]
    for name, c in r["configs"].items():
        b = c["breakdown"]
        cells = [f"{b['seconds_per_step'][k] * 1e3:.0f} ms ({b['share'][k] * 100:.0f}%)" for k in PHASES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {b['step_s'] * 1e3:.0f} | "
                     f"{b['matching_share'] * 100:.1f}% | **{b['match_loss_share'] * 100:.1f}%** |")
    lines += [""] + [f"- `{k}`: {v}" for k, v in PHASE_HELP.items()]
    for name, c in r["configs"].items():
        b = c["breakdown"]
        lines.append(f"- {name}: matching + losses = {b['match_loss_share'] * 100:.1f}% of a step "
                     f"(target <= {b['target_match_loss_share_max'] * 100:.0f}%: "
                     f"{'met' if b['meets_target'] else 'NOT met'}); "
                     f"{'synchronised pass (CUDA)' if b['synchronized'] else 'CPU, synchronous'}.")
    lines.append("")
    for name, c in r["configs"].items():
        if not c["variants"]:
            continue
        lines += [f"## Fast-path variants: {name}", "",
                  "| variant | train img/s | speed-up | step ms | matching + losses | peak memory MB "
                  "| achieved GFLOP/s | MFU | not applied / skipped |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for vname, v in c["variants"].items():
            if v.get("skipped"):
                lines.append(f"| {vname} | - | - | - | - | - | - | - | skipped: {v['skipped']} |")
                continue
            na = ", ".join(v["not_applied"]) + " (CUDA only)" if v["not_applied"] else ""
            if v.get("same_as"):
                na = (na + "; " if na else "") + f"same settings as {v['same_as']}"
            mfu = f"{v['mfu'] * 100:.1f}%" if v.get("mfu") else "n/a"
            lines.append(f"| {vname} | {v['images_per_s']:.2f} | {_f(v.get('speedup_vs_fp32_per_image'), '.2f')}x | "
                         f"{v['step_s'] * 1e3:.0f} | {v['breakdown']['match_loss_share'] * 100:.1f}% | "
                         f"{v['memory']['peak_mb']:.0f} | {v['achieved_gflops_per_s']:.1f} | {mfu} | {na} |")
        lines += [""] + [f"- `{k}`: {VARIANTS[k].description}" for k in c["variants"]] + [""]
    notes = [f"{name}: {n}" for name, c in r["configs"].items() for n in c["notes"]]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def write_outputs(record: dict, json_path: str | Path | None, md_path: str | Path | None) -> None:
    """JSON and markdown, each written atomically."""
    if json_path is not None:
        write_json(json_path, record)
    if md_path is not None:
        write_text(md_path, to_markdown(record))
