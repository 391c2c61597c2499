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

    from pipeline.engine.device import resolve_device
    from pipeline.engine.pretrain import initial_state, pretrain
    from pipeline.io import atomic_path, read_json, write_csv
    if p.model.pretrained != "weak_shot":
        with atomic_path(args.out) as tmp:
            torch.save({"used": False, "reason": f"model.pretrained is {p.model.pretrained!r}"}, tmp)
        write_csv(args.curve, [])
        print(f"pretrain: not used (model.pretrained: {p.model.pretrained}); wrote a placeholder to {args.out}")
        return
    split = read_json(args.split_dir / "split.json")
    index = read_json(args.split_dir / "index.json")
    if p.train.threads:
        torch.set_num_threads(p.train.threads)
    i = p.pretrain
    net, curve = pretrain(args.dataset_dir, index, split, arch=p.model.backbone, conv_dim=p.model.conv_dim,
                          mask_dim=p.model.mask_dim, gn_groups=p.model.gn_groups, crop_size=p.data.crop_size,
                          scale=(p.data.scale_min, p.data.scale_max), iterations=i.iterations,
                          batch_size=i.batch_size, lr=i.lr, weight_decay=p.train.weight_decay, seed=p.base.seed,
                          photometric=p.data.photometric,
                          device=str(resolve_device(p.train.device)), progress=not args.no_progress)
    with atomic_path(args.out) as tmp:
        torch.save({"used": True, **initial_state(net), "arch": p.model.backbone,
                    "steps": i.iterations, "seconds": curve[-1]["seconds"] if curve else 0.0}, tmp)
    write_csv(args.curve, curve)
    last = curve[-1] if curve else {}
    print(f"pretrain: {i.iterations} steps in {last.get('seconds', 0):.0f}s; final pixel loss "
          f"{last.get('pixel', float('nan')):.3f}, image-label loss {last.get('image', float('nan')):.3f} -> {args.out}")


if __name__ == "__main__":
    run(main)
