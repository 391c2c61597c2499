"""DVC stage `pretrain`: the weak-shot initialisation every training run starts from.

With model.pretrained: weak_shot (the synthetic default), train the backbone and the FPN pixel
decoder once on the training crops with base-class masks and image-level labels only (never a
novel mask; see pipeline/engine/pretrain.py), and write their weights for the train, ablate
and retrain stages. With any other model.pretrained (imagenet, none, a file) the stage writes a
small file saying it was not used, and training ignores it.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.cli import add_inputs, load_params, parser, run


def main() -> None:
    ap = parser(__doc__)
    add_inputs(ap, mlflow=False)
    ap.add_argument("--out", type=Path, required=True, help="initial weights file to write")
    ap.add_argument("--curve", type=Path, required=True, help="pre-training curve CSV to write")
    args = ap.parse_args()
    p, _ = load_params(args.params)

    import torch

    from pipeline.engine.pretrain import weak_shot_init
    from pipeline.io import atomic_path, read_json, write_csv
    if p.model.pretrained == "weak_shot":
        split = read_json(args.split_dir / "split.json")
        index = read_json(args.split_dir / "index.json")
    else:
        split = index = None
    init, curve = weak_shot_init(p, args.dataset_dir, index, split, progress=not args.no_progress)
    with atomic_path(args.out) as tmp:
        torch.save(init, tmp)
    write_csv(args.curve, curve)
    if not init["used"]:
        print(f"pretrain: not used (model.pretrained: {p.model.pretrained}); wrote a placeholder to {args.out}")
        return
    last = curve[-1] if curve else {}
    print(f"pretrain: {p.pretrain.iterations} steps in {last.get('seconds', 0):.0f}s; final pixel loss "
          f"{last.get('pixel', float('nan')):.3f}, image-label loss {last.get('image', float('nan')):.3f} -> {args.out}")


if __name__ == "__main__":
    run(main)
