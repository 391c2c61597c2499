"""Hungarian matching between queries and weak-shot targets (one assignment per image).

Base target cost  = w_cls * (-p(class)) + w_focal * focal(mask) + w_dice * dice(mask)
Novel target cost = w_cls * (-p(class))            (no mask: image-level label only)

Costs for the whole batch are computed in one pass on the model's device (all targets of
all images concatenated), moved to the CPU once, and split per image for scipy's
``linear_sum_assignment``. As in MaskFormer, mask costs are computed at the resolution of
the predicted masks (stride 4): target masks are downsampled (nearest) to it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from .functional import pairwise_dice_cost, pairwise_sigmoid_focal_cost


class HungarianMatcher(nn.Module):
    def __init__(self, cost_class: float = 1.0, cost_focal: float = 20.0, cost_dice: float = 1.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.cost_class, self.cost_focal, self.cost_dice = cost_class, cost_focal, cost_dice
        self.alpha, self.gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def cost_matrix(self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        """(B*Q) x T_all cost over the concatenated targets of the batch."""
        b, q = pred_logits.shape[:2]
        labels = torch.cat([t["labels"] for t in targets])
        prob = pred_logits.float().flatten(0, 1).softmax(-1)           # BQ x K+1
        cost = -self.cost_class * prob[:, labels]                      # BQ x T_all
        base_masks = [t["masks"] for t in targets if t["masks"].shape[0] > 0]
        if base_masks:
            tgt = torch.cat(base_masks).to(pred_masks.device, torch.float32)   # T_base_all x H x W
            tgt = F.interpolate(tgt[:, None], size=pred_masks.shape[-2:], mode="nearest")[:, 0]
            pm = pred_masks.float().flatten(0, 1).flatten(1)          # BQ x hw
            tgt = tgt.flatten(1)
            mask_cost = (self.cost_focal * pairwise_sigmoid_focal_cost(pm, tgt, self.alpha, self.gamma)
                         + self.cost_dice * pairwise_dice_cost(pm, tgt))
            is_base = torch.cat([torch.arange(len(t["labels"]), device=labels.device) < t["num_base"]
                                 for t in targets])
            cost[:, is_base] += mask_cost
        return cost.view(b, q, -1)

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Returns per image (query indices, target indices), both int64 on the CPU."""
        b = outputs["pred_logits"].shape[0]
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in range(b)]
        cost = self.cost_matrix(outputs["pred_logits"], outputs["pred_masks"], targets).cpu()  # one sync
        out = []
        for i, c in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(c[i].numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return out


class PerImageMatcher(nn.Module):
    """``matcher`` called once per image (a cost pass and a transfer each): the same assignment as one
    batched call (``tests/test_benchmark.py``), slower; the benchmark's baseline."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, outputs: dict, targets: list[dict], *args, **kwargs):
        b, out = outputs["pred_logits"].shape[0], []
        for i in range(b):
            one = {k: (v[i:i + 1] if torch.is_tensor(v) and v.dim() and v.shape[0] == b else v)
                   for k, v in outputs.items() if k != "aux_outputs"}
            out.extend(self.inner(one, [targets[i]], *args, **kwargs))
        return out
