"""DVC stage `download`: obtain the dataset in the prepared layout.

synthetic: generate the embedded dataset (deterministic by base.seed).
ade20k / coco_stuff_10k: find the official archive (data.archive_dir or --raw), else
download it with resume, verify its checksum, extract safely and convert the labels.
"""
from __future__ import annotations

from pathlib import Path

from stages._common import load_params, parser, run


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--out", type=Path, required=True, help="prepared dataset folder to write")
    ap.add_argument("--raw", type=Path, required=True, help="folder for downloaded archives (kept across runs)")
    args = ap.parse_args()
    p, _ = load_params(args.params)
    d = p.data
    if d.dataset == "synthetic":
        from pipeline.data.synthetic import generate_dataset
        summary = generate_dataset(args.out, d.synthetic, p.base.seed, progress=not args.no_progress)
    else:
        from pipeline.data.acquire import acquire_dataset
        summary = acquire_dataset(d.dataset, args.out, args.raw, url=d.url, checksum=d.checksum,
                                  archive_dir=d.archive_dir, workers=d.prepare_workers,
                                  progress=not args.no_progress)
    print(f"dataset '{d.dataset}' ready in {args.out}: "
          + ", ".join(f"{k}={v}" for k, v in summary.items() if isinstance(v, (int, str))))


if __name__ == "__main__":
    run(main)
