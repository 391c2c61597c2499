"""DVC stage `download`: obtain the dataset in the prepared layout.

synthetic: generate the embedded dataset (deterministic by base.seed).
ade20k / coco_stuff_10k: find the official archive (data.archive_dir or --raw), else
download it with resume, verify its checksum, extract safely and convert the labels.
Label values missing from the class table are set to 255 and reported in a warning line.

data.url and data.checksum may be scoped per dataset
('ade20k=md5:<hex>, coco_stuff_10k=sha256:<hex>'): only the chosen dataset's entry applies.

Under `dvc repro` / `dvc exp run`, DVC deletes the previous --out before the stage runs; when
the stage fails, the error says `dvc checkout <out>` to get it back from the DVC cache.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.cli import load_params, parser, run


class DownloadStageError(RuntimeError):
    """A failure of the stage, with the restore hint appended."""


def restore_hint(out: Path) -> str:
    """What to run to get the previous ``out`` back, when DVC removed it before this run ('' if not)."""
    if not os.environ.get("DVC_STAGE") or out.exists():
        return ""
    return (f"DVC removed the previous {out} before running this stage; `dvc checkout {out}` restores the last "
            "committed version from the DVC cache.")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--out", type=Path, required=True, help="prepared dataset folder to write")
    ap.add_argument("--raw", type=Path, required=True, help="folder for downloaded archives (kept across runs)")
    args = ap.parse_args()
    p, _ = load_params(args.params)
    d = p.data
    try:
        summary = _obtain(d, p.base.seed, args)
    except (ValueError, RuntimeError, OSError) as e:
        hint = restore_hint(args.out)
        if hint:
            raise DownloadStageError(f"{e}\n{hint}") from e
        raise
    except KeyboardInterrupt:
        hint = restore_hint(args.out)
        if hint:
            print(hint, file=sys.stderr)
        raise
    from pipeline.data.prepare import unknown_values_warning
    warning = unknown_values_warning(summary)
    if warning:
        print(warning, file=sys.stderr)
    shown = {k: v for k, v in summary.items() if isinstance(v, (int, str))}
    if summary.get("unknown_label_values"):
        shown["unknown_label_values"] = " ".join(
            f"{v}:{n}img/{summary.get('unknown_label_pixels', {}).get(v, '?')}px"
            for v, n in summary["unknown_label_values"].items())
    print(f"dataset '{d.dataset}' ready in {args.out}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))


def _obtain(d, seed: int, args) -> dict:
    if d.dataset == "synthetic":
        from pipeline.data.synthetic import generate_dataset
        return generate_dataset(args.out, d.synthetic, seed, progress=not args.no_progress)
    from pipeline.data.acquire import acquire_dataset
    return acquire_dataset(d.dataset, args.out, args.raw, url=d.url, checksum=d.checksum,
                           archive_dir=d.archive_dir, workers=d.prepare_workers,
                           progress=not args.no_progress)


if __name__ == "__main__":
    run(main)
