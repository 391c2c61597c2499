"""Benchmark: training / evaluation / data-loading throughput on this machine's device.

Measures, on synthetic data generated into a temporary folder (nothing under data/ is read
or written), for each config of --configs:

  default   the params file's model and training settings (CPU-sized by default)
  paper     the paper's model: MaskFormer ResNet-50 (frozen BN), d=256, 100 queries,
            6 decoder layers, crop 640, batch 8 (--paper-crop / --paper-batch reduce it)

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

GPU figures:  python -m stages.benchmark --params params.yaml --device cuda
"""
from __future__ import annotations

import sys
from pathlib import Path

from stages._common import load_params, parser, run


def _names(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    if text.strip().lower() == "all":
        return allowed
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"{flag}: unknown name '{bad[0]}'; allowed: {', '.join(allowed)}, all, none")
    return names


def main(argv: list[str] | None = None) -> None:
    from pipeline.engine.benchmark import VARIANTS, Options, run_benchmark, write_outputs
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
    opts = Options(
        steps=args.steps, warmup=args.warmup, configs=configs,
        variants=_names(args.variants, tuple(VARIANTS), "--variants"),
        variant_configs=None if args.variant_configs is None else _names(args.variant_configs, configs,
                                                                         "--variant-configs"),
        paper_batch=args.paper_batch, paper_crop=args.paper_crop, paper_steps=args.paper_steps,
        paper_warmup=args.paper_warmup, eval_images=args.eval_images, loader_batches=args.loader_batches,
        device=args.device or p.train.device, compile_on_cpu=args.compile_on_cpu,
        workdir=str(args.workdir) if args.workdir else None, progress=not args.no_progress,
        log=None if args.no_progress else (lambda m: print(m, file=sys.stderr, flush=True)))
    record = run_benchmark(p, opts)
    write_outputs(record, args.out, args.md)
    for name, c in record["configs"].items():
        b = c["breakdown"]
        print(f"{name}: train {c['train']['images_per_s']:.2f} img/s, eval {c['eval']['images_per_s']:.2f} img/s, "
              f"loader {c['loader']['images_per_s']:.1f} img/s, matching + losses "
              f"{b['match_loss_share'] * 100:.1f}% of a step, peak {c['train']['memory']['peak_mb']:.0f} MB")
    print(f"wrote {args.out} and {args.md}")


if __name__ == "__main__":
    run(main)
