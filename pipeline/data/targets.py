"""Weak-shot training targets, built per augmented crop (SIMFORMER.md, "Training targets").

One target per class present in the crop's full label map. Base classes come first, each
with its binary mask; novel classes follow with no mask (their label is the crop-level
image label). The full label map is kept only to tell which classes are present and, for
the similarity losses, which pixels are base.
"""
from __future__ import annotations

import torch


def weak_shot_targets(sem_seg: torch.Tensor, valid: torch.Tensor, base_ids: torch.Tensor,
                      novel_ids: torch.Tensor, supervise_novel_masks: bool = False) -> list[dict]:
    """``sem_seg`` B x H x W (255 = ignore and padding), ``valid`` B x H x W (False on padding).

    ``supervise_novel_masks=True`` gives novel classes their masks too: the fully supervised
    oracle, for comparison only.
    """
    k = int(max(base_ids.max().item() if base_ids.numel() else -1,
                novel_ids.max().item() if novel_ids.numel() else -1)) + 1
    is_base = torch.zeros(k + 1, dtype=torch.bool, device=sem_seg.device)
    is_base[base_ids.to(sem_seg.device)] = True
    is_novel = torch.zeros(k + 1, dtype=torch.bool, device=sem_seg.device)
    is_novel[novel_ids.to(sem_seg.device)] = True
    targets = []
    for seg, val in zip(sem_seg, valid):
        present = torch.unique(seg)
        present = present[present < k]
        base = present[is_base[present]]
        novel = present[is_novel[present]]
        if supervise_novel_masks:
            base, novel = torch.cat([base, novel]), novel[:0]
        masks = (seg[None] == base[:, None, None]).float()
        targets.append({
            "labels": torch.cat([base, novel]),
            "masks": masks,
            "num_base": int(base.numel()),
            "sem_seg": seg,
            "valid": val,
            "base_ids": base,
            "novel_ids": novel,
        })
    return targets
