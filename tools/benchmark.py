"""Benchmark: training / evaluation / data-loading throughput on this machine's device (not a DVC stage).

Measures, on synthetic data generated into a temporary folder (nothing under data/ is read
or written), for each config of --configs:

  default   the params file's model and training settings (CPU-sized by default)
  paper     the paper's model from --paper-preset (MaskFormer ResNet-50, frozen BN, d=256,
            100 queries, 6 decoder layers) at crop 640, batch 8 (--paper-crop / --paper-batch)

training images/s (data loading included), a breakdown of one step (data wait, copy +
targets, forward, matching + losses, backward, optimizer; synchronised per phase on CUDA),
peak memory, evaluation images/s, DataLoader images/s alone and its ratio to training,
forward FLOPs (FlopCounterMode), achieved FLOP/s and MFU against the GPU's dense bf16 peak
(H100 SXM / H200: 989 TFLOP/s; CPU: achieved GFLOP/s only), and the fast-path variants side
by side (--variants):

  fp32_per_image               fp32, NCHW, plain AdamW, matcher called once per image
  bf16+channels_last+batched   bf16 autocast, channels_last, TF32, fused AdamW, batched matching
  +point_loss                  + point-sampled MaskLoss (loss.mask_points = 12544)
  +compile                     + torch.compile(model)

On the CPU, bf16 / channels_last / TF32 / fused AdamW do not apply (the variant runs without
them and the report says so), torch.compile is skipped (--compile-on-cpu forces it), and the
paper config runs a reduced budget (min(--steps, 2) steps after min(--warmup, 1) warm-up, 4
evaluation images, 4 loader batches; --paper-steps / --paper-warmup override). Writes JSON
(--out) and a markdown table (--md), atomically; no timing is asserted anywhere else.

GPU figures:  python -m tools.benchmark --params params.yaml --device cuda
"""
from __future__ import annotations

import sys
from pathlib import Path

from pipeline.cli import load_params, parser, run

ROOT = Path(__file__).resolve().parents[1]
PHASE_HELP = {
    "data_wait": "waiting for the DataLoader (the whole loading when train.workers = 0)",
    "transfer": "host-to-device copy and weak-shot targets",
    "forward": "model forward (autocast when amp)",
    "match_loss": "Hungarian matching and every loss (all decoder layers, SimNet)",
    "backward": "backward pass",
    "optimizer": "gradient clipping, AdamW step, lr schedule",
}


def _names(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    if text.strip().lower() == "all":
        return allowed
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if bad := [n for n in names if n not in allowed]:
        raise ValueError(f"{flag}: unknown name '{bad[0]}'; allowed: {', '.join(allowed)}, all, none")
    return names


def main(argv: list[str] | None = None) -> None:
    import yaml

    from pipeline.engine.benchmark import VARIANTS, Options, run_benchmark
    from pipeline.io import write_json, write_text
    ap = parser(__doc__)
    ap.add_argument("--out", type=Path, default=Path("reports/benchmark.json"),
                    help="JSON record to write (default: reports/benchmark.json)")
    ap.add_argument("--md", type=Path, default=Path("reports/benchmark.md"),
                    help="markdown tables to write (default: reports/benchmark.md)")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per measurement (default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps before them (default 5)")
    ap.add_argument("--configs", default="default,paper", help="comma list of: default, paper (default: both)")
    ap.add_argument("--variants", default="all",
                    help="fast-path variants, comma list of: " + ", ".join(VARIANTS) + "; 'all' (default) or 'none'")
    ap.add_argument("--variant-configs", default=None,
                    help="configs that get the variants (default: every config of --configs)")
    ap.add_argument("--paper-preset", type=Path, default=ROOT / "presets/paper-coco_stuff_10k.yaml",
                    help="preset whose model, loss and learning rates make the paper config "
                         "(default: presets/paper-coco_stuff_10k.yaml)")
    ap.add_argument("--paper-batch", type=int, default=8, help="paper config batch size (default 8; reduce on CPU)")
    ap.add_argument("--paper-crop", type=int, default=640, help="paper config crop size (default 640; reduce on CPU)")
    ap.add_argument("--paper-steps", type=int, default=None,
                    help="paper config timed steps (default: --steps on CUDA, min(--steps, 2) on CPU)")
    ap.add_argument("--paper-warmup", type=int, default=None,
                    help="paper config warm-up steps (default: --warmup on CUDA, min(--warmup, 1) on CPU)")
    ap.add_argument("--eval-images", type=int, default=20, help="test images for evaluation images/s (default 20)")
    ap.add_argument("--loader-batches", type=int, default=20, help="batches for the loader-only figure (default 20)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                    help="device (default: the params file's train.device)")
    ap.add_argument("--compile-on-cpu", action="store_true", help="measure torch.compile on the CPU too (slow)")
    ap.add_argument("--workdir", type=Path, default=None, help="parent of the temporary data folder (default: $TMPDIR)")
    args = ap.parse_args(argv)
    p, _ = load_params(args.params)
    for flag in ("steps", "paper_batch", "paper_crop", "eval_images", "loader_batches"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    configs = _names(args.configs, ("default", "paper"), "--configs")
    if not configs:
        raise ValueError("--configs: name at least one of default, paper")
    paper = None
    if "paper" in configs:
        try:
            paper = yaml.safe_load(args.paper_preset.read_text())
        except OSError as e:
            raise FileNotFoundError(f"--paper-preset '{args.paper_preset}' cannot be read: {e.strerror}") from None
    opts = Options(
        steps=args.steps, warmup=args.warmup, configs=configs, paper=paper,
        variants=_names(args.variants, tuple(VARIANTS), "--variants"),
        variant_configs=None if args.variant_configs is None else _names(args.variant_configs, configs,
                                                                         "--variant-configs"),
        paper_batch=args.paper_batch, paper_crop=args.paper_crop, paper_steps=args.paper_steps,
        paper_warmup=args.paper_warmup, eval_images=args.eval_images, loader_batches=args.loader_batches,
        device=args.device or p.train.device, compile_on_cpu=args.compile_on_cpu,
        workdir=str(args.workdir) if args.workdir else None,
        log=(lambda _m: None) if args.no_progress else (lambda m: print(m, file=sys.stderr, flush=True)))
    record = run_benchmark(p, opts)
    write_json(args.out, record)
    write_text(args.md, to_markdown(record))
    for name, c in record["configs"].items():
        print(f"{name}: train {c['train']['images_per_s']:.2f} img/s, eval {c['eval']['images_per_s']:.2f} img/s, "
              f"loader {c['loader']['images_per_s']:.1f} img/s, matching + losses "
              f"{_pct(c['breakdown']['match_loss_share'])} of a step, peak {c['train']['memory']['peak_mb']:.0f} MB")
    print(f"wrote {args.out} and {args.md}")


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(map(str, r)) + " |" for r in rows] + [""]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


def to_markdown(r: dict) -> str:
    """The benchmark record as markdown: environment, summary, one step, fast-path variants, notes."""
    from pipeline.engine.benchmark import PHASES, VARIANTS
    env, configs = r["environment"], r["configs"]
    load = (f" Load average (1 min) {env['load_average'][0]:.1f} at the start, {env['load_average_end'][0]:.1f} at the "
            "end: other processes share these CPUs." if env["device"] == "cpu" else "")
    lines = ["# SimFormer pipeline benchmark", "",
             f"Device **{env['device_name']}** ({env['device']}), torch {env['torch']}, torchvision "
             f"{env['torchvision']}, Python {env['python']}, {env['torch_threads']} torch threads, {env['cpu_count']} "
             f"CPUs ({env['cpu']}); git {env['git']['commit'][:12]}; {r['created']}.{load}", "",
             f"Peak for MFU: {r['device_peak_source']}" + (f" = {r['device_peak_flops'] / 1e12:.0f} TFLOP/s."
                                                            if r["device_peak_flops"] else "."),
             "Peak table (dense bf16): " + "; ".join(f"{k} {v['flops_per_s'] / 1e12:.0f} TFLOP/s"
                                                      for k, v in r["peak_flops_table"].items()) + ".", "",
             "## Summary", ""]
    lines += _table(["config", "crop", "batch", "steps", "train img/s", "step ms", "eval img/s", "loader img/s",
                     "loader/train", "peak memory MB", "fwd GFLOP/img", "achieved GFLOP/s", "MFU"],
                    [[n, c["crop_size"], c["batch_size"], c["train"]["steps"], f"{c['train']['images_per_s']:.2f}",
                      f"{c['train']['step_s'] * 1e3:.0f}", f"{c['eval']['images_per_s']:.2f}",
                      f"{c['loader']['images_per_s']:.1f}",
                      "n/a" if c["loader"]["loader_over_train"] is None else f"{c['loader']['loader_over_train']:.2f}",
                      f"{c['train']['memory']['peak_mb']:.0f}", f"{c['flops']['forward_per_image'] / 1e9:.2f}",
                      f"{c['flops']['achieved_gflops_per_s']:.1f}", _pct(c["flops"]["mfu"])]
                     for n, c in configs.items()])
    lines += ["Training images/s include data loading (the real loop); loader/train > 1 means the DataLoader alone is "
              "faster than training. Evaluation: the evaluate stage's fp32 inference, one image at a time. Memory: "
              + "; ".join(sorted({c["train"]["memory"]["kind"] for c in configs.values()})) + ".", "",
              "## One training step", ""]
    steps = {n: c["breakdown"] for n, c in configs.items()}
    lines += _table(["config", *PHASES, "step ms", "matching", "matching + losses"],
                    [[n, *(f"{b['seconds_per_step'][k] * 1e3:.0f} ms ({b['share'][k] * 100:.0f}%)" for k in PHASES),
                      f"{b['step_s'] * 1e3:.0f}", _pct(b["matching_share"]), f"**{_pct(b['match_loss_share'])}**"]
                     for n, b in steps.items()])
    lines += [f"- `{k}`: {v}" for k, v in PHASE_HELP.items()]
    lines += [f"- {n}: matching + losses = {_pct(b['match_loss_share'])} of a step (target <= "
              f"{b['target_match_loss_share_max'] * 100:.0f}%: {'met' if b['meets_target'] else 'NOT met'}); "
              f"{'synchronised pass (CUDA)' if b['synchronized'] else 'CPU, synchronous'}." for n, b in steps.items()]
    lines.append("")
    for name, c in configs.items():
        if not c["variants"]:
            continue
        rows = []
        for vname, v in c["variants"].items():
            if v["skipped"]:
                rows.append([vname, *["-"] * 7, f"skipped: {v['skipped']}"])
                continue
            speedup = v.get("speedup_vs_fp32_per_image")
            rows.append([vname, f"{v['images_per_s']:.2f}", "n/a" if speedup is None else f"{speedup:.2f}x",
                         f"{v['step_s'] * 1e3:.0f}", _pct(v["breakdown"]["match_loss_share"]),
                         f"{v['memory']['peak_mb']:.0f}", f"{v['achieved_gflops_per_s']:.1f}", _pct(v["mfu"]),
                         ", ".join(v["not_applied"]) + " (CUDA only)" if v["not_applied"] else ""])
        lines += [f"## Fast-path variants: {name}", ""]
        lines += _table(["variant", "train img/s", "speed-up", "step ms", "matching + losses", "peak memory MB",
                         "achieved GFLOP/s", "MFU", "not applied / skipped"], rows)
        lines += [f"- `{k}`: {VARIANTS[k][0]}" for k in c["variants"]] + [""]
    if notes := [f"{name}: {n}" for name, c in configs.items() for n in c["notes"]]:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    run(main)
