"""DVC stage `prepare`: write the weak-shot split (base / novel classes) and the per-image
index (image-level labels, usability, class -> images) for the chosen data.split."""
from __future__ import annotations

from pathlib import Path

from pipeline.cli import load_params, parser, run


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--dataset-dir", type=Path, required=True, help="prepared dataset folder")
    ap.add_argument("--out", type=Path, required=True, help="split folder to write (split.json, index.json)")
    args = ap.parse_args()
    p, _ = load_params(args.params)
    from pipeline.data.splits import build_split, write_split
    split, index = build_split(args.dataset_dir, p.data.dataset, p.data.split,
                               workers=p.data.prepare_workers, progress=not args.no_progress)
    write_split(args.out, split, index)
    n_usable = sum(e["usable"] for e in index["train"])
    print(f"split {p.data.dataset}/{p.data.split}: {len(split['base'])} base, {len(split['novel'])} novel classes; "
          f"{n_usable}/{len(index['train'])} usable training images, {len(index['test'])} test images")


if __name__ == "__main__":
    run(main)
