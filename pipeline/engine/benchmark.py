"""Throughput on the current device (``python -m tools.benchmark``), for the params file's config
and the paper preset's model, on synthetic data: training images/s (the real loop, data loading
included), the phases of a step, peak memory, evaluation and DataLoader images/s, FLOPs and MFU
against :data:`PEAK_FLOPS`, and the fast-path :data:`VARIANTS` side by side. No DVC, no MLflow.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import gc
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import Params, SyntheticConfig, build_params, to_dict
from ..losses.matcher import PerImageMatcher
from .device import resolve_device
from .train import FastPath, build_train_loader, build_training, train_step

# Dense bf16 tensor-core peak (FLOP/s, no sparsity) from the vendors' datasheets; matched against
# torch.cuda.get_device_name() by substring, first match wins (most specific first).
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
# data_wait (for the DataLoader), then the phases train_step marks
PHASES = ("data_wait", "transfer", "forward", "match_loss", "backward", "optimizer")
_OFF = {"amp": False, "channels_last": False, "tf32": False, "fused_adamw": False, "compile": False}
_FAST = {**_OFF, "amp": True, "channels_last": True, "tf32": True, "fused_adamw": True}
# name -> (description, train.* switches, matcher once per image, loss.mask_points)
VARIANTS: dict[str, tuple[str, dict, bool, int]] = {
    "fp32_per_image": ("baseline: fp32 (no amp, no TF32), contiguous NCHW, plain AdamW, matcher called once "
                       "per image, dense MaskLoss", _OFF, True, 0),
    "bf16+channels_last+batched": ("bf16 autocast, channels_last, TF32, fused AdamW, batched matching (one cost "
                                   "pass per layer), dense MaskLoss", _FAST, False, 0),
    "+point_loss": (f"as above + point-sampled MaskLoss (loss.mask_points={POINT_LOSS_POINTS})", _FAST, False,
                    POINT_LOSS_POINTS),
    "+compile": ("as above + torch.compile(model)", {**_FAST, "compile": True}, False, POINT_LOSS_POINTS),
}
NO_CPU_COMPILE = ("torch.compile is not measured on the CPU: compiling takes minutes on a few cores and a short "
                  "run cannot amortise it (--compile-on-cpu forces it)")


@dataclass
class Options:
    steps: int = 20
    warmup: int = 5
    configs: tuple[str, ...] = ("default", "paper")
    variants: tuple[str, ...] = tuple(VARIANTS)
    variant_configs: tuple[str, ...] | None = None     # None = every config in ``configs``
    paper: dict | None = None                          # the paper preset: overrides of params groups
    paper_batch: int = 8
    paper_crop: int = 640
    paper_steps: int | None = None                     # None: steps on CUDA, min(steps, 2) on the CPU
    paper_warmup: int | None = None                    # None: warmup on CUDA, min(warmup, 1) on the CPU
    eval_images: int = 20
    loader_batches: int = 20
    device: str = "auto"
    compile_on_cpu: bool = False
    workdir: str | None = None
    log: Callable[[str], None] = lambda _message: None


def _rss(key: str = "VmRSS") -> int:
    """``/proc/self/status`` VmRSS (resident set) or VmHWM (its peak) in bytes (Linux; 0 elsewhere)."""
    with contextlib.suppress(OSError, StopIteration):
        return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith(key + ":"))
    return 0


class PhaseTimer:
    """Wall time per phase of ``train_step`` (its ``mark`` hook) and in the matcher (:meth:`watch`)."""

    def __init__(self, sync: Callable[[], None] = lambda: None):
        self.sync, self.totals, self._t, self._m = sync, dict.fromkeys((*PHASES, "matching"), 0.0), 0.0, 0.0

    def start(self) -> None:
        self.sync()
        self._t = time.perf_counter()

    def __call__(self, phase: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.totals[phase] += now - self._t
        self._t = now

    def watch(self, matcher: nn.Module) -> list:
        """Add up the time of ``matcher``'s calls as ``matching`` (forward hooks)."""
        def before(*_):
            self.sync()
            self._m = time.perf_counter()

        def after(*_):
            self.sync()
            self.totals["matching"] += time.perf_counter() - self._m
        return [matcher.register_forward_pre_hook(before), matcher.register_forward_hook(after)]


def device_peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s, source) for a GPU listed in :data:`PEAK_FLOPS`; None otherwise."""
    if device.type != "cuda":
        return None, "CPU: no peak table; achieved GFLOP/s only"
    name = torch.cuda.get_device_name(device)
    return next(((f, s) for key, f, s in PEAK_FLOPS if key in name),
                (None, f"'{name}' is not in the peak table; achieved FLOP/s only"))


def environment(device: torch.device) -> dict:
    import torchvision

    from ..repo import git_commit
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((s.split(":", 1)[1].strip() for s in cpuinfo if s.startswith("model name")), platform.processor())
    cuda = device.type == "cuda"
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if cuda else cpu,
            "cuda": torch.version.cuda if cuda else None,
            "gpu_memory_gb": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1) if cuda else None,
            "load_average": [round(x, 2) for x in os.getloadavg()],   # other processes slow every figure
            "git": {"commit": git_commit(Path(__file__).resolve().parents[2])}}


def config_params(p: Params, name: str, opts: Options) -> tuple[Params, str]:
    """``default``: the params file's; ``paper``: with the preset's model, loss and learning rates, at
    ``opts.paper_crop`` / ``opts.paper_batch``. Untrained weights (speed does not depend on them)."""
    raw = to_dict(p)
    if name == "paper":
        if not opts.paper:
            raise ValueError("the paper benchmark config needs the paper preset (Options.paper)")
        raw["model"].update(opts.paper.get("model", {}))
        raw["loss"].update(opts.paper.get("loss", {}))
        raw["train"].update({k: v for k, v in opts.paper.get("train", {}).items() if k in ("lr", "backbone_lr_mult")})
        raw["train"]["batch_size"], raw["data"]["crop_size"] = opts.paper_batch, opts.paper_crop
        raw["train"]["pair_sampling"] &= opts.paper_batch % 2 == 0
    elif name != "default":
        raise ValueError(f"unknown benchmark config '{name}'; allowed: default, paper")
    raw["model"]["pretrained"] = "none"
    cp = build_params(raw)
    m = cp.model
    return cp, ("the params file's model and training settings (model.pretrained: none)" if name == "default" else
                f"paper: MaskFormer {m.backbone}, d={m.hidden_dim}, {m.num_queries} queries, {m.dec_layers} decoder "
                f"layers, crop {opts.paper_crop}, batch {opts.paper_batch} (the paper: crop 640, batch 8)")


def make_dataset(root: Path, p: Params, num_train: int, num_test: int, image_size: int) -> tuple[Path, dict, dict]:
    """Synthetic dataset + split 1 into ``root`` (prepared layout, split.json, index.json contents)."""
    from ..data.splits import build_split
    from ..data.synthetic import generate_dataset
    ds = root / f"synthetic_{image_size}_{num_train}_{num_test}"
    if not (ds / "classes.json").is_file():
        generate_dataset(ds, SyntheticConfig(num_train, num_test, image_size, p.data.synthetic.jitter, p.data.synthetic.cooccur), p.base.seed, progress=False)
    return ds, *build_split(ds, "synthetic", 1, workers=1, progress=False)


# ============================================================================ measurements
def count_forward_flops(p: Params, num_classes: int, size: int) -> tuple[float, str]:
    """Forward FLOPs of one ``size`` x ``size`` image (FlopCounterMode: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..model import build_model

    def count(where: str) -> float:       # (FlopCounterMode needs autograd on: no torch.no_grad)
        with torch.device(where), FlopCounterMode(display=False) as fc:
            build_model(p.model, num_classes)(torch.zeros(1, 3, size, size))
        return float(fc.get_total_flops())
    try:
        return count("meta"), "meta"
    except Exception:                          # an op without a meta kernel: count on the CPU
        return count("cpu"), "cpu"


def measure_training(p: Params, fast: FastPath, per_image: bool, dataset_dir: Path, split: dict, index: dict,
                     device: torch.device, steps: int, warmup: int) -> tuple[dict, nn.Module]:
    """Train ``warmup + steps`` steps (plus ``steps`` synchronised ones on CUDA); (figures, model)."""
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else _rss()
    with contextlib.suppress(OSError):        # reset VmHWM (peak RSS), so that it is this run's peak (Linux)
        Path("/proc/self/clear_refs").write_text("5")
    it = iter(build_train_loader(p, dataset_dir, index, 0, warmup + steps * (2 if cuda else 1), device))
    tr = build_training(p, split, device, fast)
    if per_image:
        tr.state.criterion.matcher = PerImageMatcher(tr.state.criterion.matcher)
    tr.state.model.train()
    tr.state.criterion.train()

    def run(n: int, timer: PhaseTimer) -> tuple[float, int]:
        handles = timer.watch(tr.state.criterion.matcher)
        sync()
        t0, images = time.perf_counter(), 0
        for _ in range(n):
            timer.start()
            batch = next(it)
            timer("data_wait")
            train_step(tr, batch, mark=timer)
            images += batch["image"].shape[0]
        sync()
        for h in handles:
            h.remove()
        return time.perf_counter() - t0, images

    warmup_s, _ = run(warmup, PhaseTimer())
    # CUDA: throughput without syncs, then a pass synchronised per phase; CPU: synchronous, one pass gives both
    timer = PhaseTimer(sync)
    seconds, images = run(steps, PhaseTimer() if cuda else timer)
    if cuda:
        run(steps, timer)
    matching = timer.totals.pop("matching") / steps
    per_step = {k: v / steps for k, v in timer.totals.items()}
    total = sum(per_step.values())
    share = {k: v / total if total else 0.0 for k, v in per_step.items()}
    peak, kind = ((torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated") if cuda
                  else (_rss("VmHWM"), "cpu peak RSS of the run (VmHWM, reset before it)"))
    return {"images_per_s": images / seconds if seconds > 0 else 0.0, "step_s": seconds / steps, "steps": steps,
            "warmup": warmup, "images": images, "seconds": seconds, "warmup_s": warmup_s,
            "fast_path": dataclasses.asdict(fast), "per_image_matching": per_image, "mask_points": p.loss.mask_points,
            "memory": {"kind": kind, "peak_mb": peak / 2**20, "growth_mb": max(0, peak - before) / 2**20},
            "breakdown": {"synchronized": cuda, "seconds_per_step": per_step, "step_s": total, "share": share,
                          "matching_s_per_step": matching, "matching_share": matching / total if total else 0.0,
                          "match_loss_share": share["match_loss"]}}, tr.state.model


def measure_loader(p: Params, dataset_dir: Path, index: dict, device: torch.device, batches: int) -> dict:
    """The training DataLoader alone (decode, augment, collate, pin) over ``batches`` batches."""
    it = iter(build_train_loader(p, dataset_dir, index, 0, batches + 1, device))
    next(it)                                   # worker start-up stays out of the figure
    t0 = time.perf_counter()
    images = sum(batch["image"].shape[0] for batch in it)
    seconds = time.perf_counter() - t0
    return {"images_per_s": images / seconds if seconds > 0 else 0.0, "images": images, "batches": batches,
            "seconds": seconds, "workers": p.train.workers, "pin_memory": device.type == "cuda"}


def measure_eval(model: nn.Module, dataset_dir: Path, index: dict, num_classes: int, device: torch.device,
                 images: int, short_edge: int) -> dict:
    """The evaluate stage's inference (fp32, one image at a time, confusion matrix) on ``images`` images."""
    from .evaluate import evaluate
    n = min(images, len(index["test"]))
    for k in (1, n):                           # one image to warm up, then the timed pass
        t0 = time.perf_counter()
        evaluate(model.eval(), dataset_dir, index["test"], num_classes, device, short_edge, 0, max_images=k,
                 progress=False)            # (evaluate reads every prediction back: synchronised)
    seconds = time.perf_counter() - t0
    return {"images_per_s": n / seconds if seconds > 0 else 0.0, "images": n, "seconds": seconds,
            "short_edge": short_edge, "precision": "fp32"}


def _budget(name: str, opts: Options, device: torch.device) -> dict:
    """Steps, warm-up, eval images, loader batches; the paper config on the CPU gets a reduced budget."""
    cut = name == "paper" and device.type != "cuda"
    b = {k: getattr(opts, k) for k in ("steps", "warmup", "eval_images", "loader_batches")}
    if cut:
        b = {k: min(v, {"steps": 2, "warmup": 1}.get(k, 4)) for k, v in b.items()}
    if name == "paper":
        b["steps"] = b["steps"] if opts.paper_steps is None else opts.paper_steps
        b["warmup"] = b["warmup"] if opts.paper_warmup is None else opts.paper_warmup
    return {**b, "steps": max(1, b["steps"]), "warmup": max(0, b["warmup"]), "reduced": cut}


def benchmark_config(name: str, p: Params, opts: Options, device: torch.device, root: Path,
                     peak: float | None) -> dict:
    cp, desc = config_params(p, name, opts)
    b, crop, batch = _budget(name, opts, device), cp.data.crop_size, cp.train.batch_size
    size = cp.data.synthetic.image_size if name == "default" else min(max(crop, 32), 1024)
    num_train, num_test = max(16, 2 * batch), max(2, b["eval_images"])
    opts.log(f"[{name}] generating {num_train}+{num_test} synthetic images of {size}px")
    ds, split, index = make_dataset(root, cp, num_train, num_test, size)
    fwd, counted_on = count_forward_flops(cp, split["num_classes"], crop)
    notes = [f"CPU: reduced budget ({b['steps']} steps after {b['warmup']} warm-up, {b['eval_images']} eval images, "
             f"{b['loader_batches']} loader batches)"] if b["reduced"] else []
    if cp.train.compile and device.type != "cuda" and not opts.compile_on_cpu:
        notes.append("train.compile is on but not measured on the CPU (use --compile-on-cpu)")
        cp = dataclasses.replace(cp, train=dataclasses.replace(cp.train, compile=False))

    def measure(vp: Params, per_image: bool, what: str) -> tuple[dict | None, nn.Module | None]:
        """Train with ``vp``; None when torch.compile would run on the CPU (not measured)."""
        fast = FastPath.resolve(vp.train, device)
        if fast.compile and device.type != "cuda" and not opts.compile_on_cpu:
            return None, None
        opts.log(f"[{name}] {what}")
        warm = max(b["warmup"], 2) if fast.compile else b["warmup"]
        r, model = measure_training(vp, fast, per_image, ds, split, index, device, b["steps"], warm)
        achieved = 3 * fwd * r["images_per_s"]
        return {**r, "not_applied": FastPath.not_applied(vp.train, device), "achieved_flops_per_s": achieved,
                "achieved_gflops_per_s": achieved / 1e9, "mfu": achieved / peak if peak else None}, model

    main, model = measure(cp, False, f"training {b['warmup']}+{b['steps']} steps, batch {batch}, crop {crop}")
    if main["not_applied"]:
        notes.append(f"CUDA-only switches not applied on {device.type}: {', '.join(main['not_applied'])}")
    bd = main.pop("breakdown")
    bd.update(target_match_loss_share_max=MATCH_LOSS_TARGET, meets_target=bd["match_loss_share"] <= MATCH_LOSS_TARGET)
    out: dict[str, Any] = {
        "description": desc, "model": to_dict(cp.model), "crop_size": crop, "batch_size": batch,
        "num_classes": split["num_classes"], "budget": b, "notes": notes, "breakdown": bd,
        "loss": to_dict(cp.loss),
        "dataset": {"image_size": size, "num_train": num_train, "num_test": num_test},
        "train": {k: v for k, v in main.items() if not k.startswith("achieved") and k != "mfu"},
        "flops": {"forward_per_image": fwd, "train_per_image": 3 * fwd, "counted_on": counted_on,
                  "note": "model forward only (FlopCounterMode); training ~ 3 x forward; criterion not counted",
                  **{k: main[k] for k in ("achieved_flops_per_s", "achieved_gflops_per_s", "mfu")}}}
    opts.log(f"[{name}] evaluation on {b['eval_images']} images")
    out["eval"] = measure_eval(model, ds, index, split["num_classes"], device, b["eval_images"], crop)
    del model
    opts.log(f"[{name}] data loader alone, {b['loader_batches']} batches")
    out["loader"] = measure_loader(cp, ds, index, device, b["loader_batches"])
    out["loader"]["loader_over_train"] = (out["loader"]["images_per_s"] / main["images_per_s"]
                                          if main["images_per_s"] > 0 else None)
    out["variants"] = {}
    wanted = opts.configs if opts.variant_configs is None else opts.variant_configs
    for vname in opts.variants if name in wanted else ():
        description, switches, per_image, mask_points = VARIANTS[vname]
        raw = to_dict(cp)
        raw["train"].update(switches)
        raw["loss"]["mask_points"] = mask_points
        vp = build_params(raw)
        r, _ = measure(vp, per_image, f"variant {vname}")
        out["variants"][vname] = {"description": description, "skipped": None, **(r or {
            "skipped": NO_CPU_COMPILE, "not_applied": FastPath.not_applied(vp.train, device)})}
    base = out["variants"].get("fp32_per_image", {}).get("images_per_s")
    for rec in out["variants"].values():
        if base and rec.get("images_per_s"):
            rec["speedup_vs_fp32_per_image"] = rec["images_per_s"] / base
    return out


def run_benchmark(p: Params, opts: Options) -> dict:
    """Every measurement of this module for ``opts.configs``; returns the record."""
    device = resolve_device(opts.device)
    if p.train.threads:
        torch.set_num_threads(p.train.threads)
    if bad := [n for n in opts.variants if n not in VARIANTS]:
        raise ValueError(f"unknown benchmark variant '{bad[0]}'; allowed: {', '.join(VARIANTS)}")
    peak, peak_source = device_peak_flops(device)
    settings = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name not in ("log", "paper")}
    wanted = opts.configs if opts.variant_configs is None else opts.variant_configs
    record: dict[str, Any] = {
        "schema": 1, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device), "settings": {**settings, "train": to_dict(p.train),
                                                         "variant_configs": wanted},
        "peak_flops_table": {key: {"flops_per_s": f, "source": s} for key, f, s in PEAK_FLOPS},
        "device_peak_flops": peak, "device_peak_source": peak_source, "configs": {}}
    with tempfile.TemporaryDirectory(prefix="simformer-bench-", dir=opts.workdir) as tmp:
        for name in opts.configs:
            record["configs"][name] = benchmark_config(name, p, opts, device, Path(tmp), peak)
    record["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return record
