"""Mask losses shared by matching, MaskLoss and CompLoss.

All take mask *logits* and binary targets flattened to N x P (P pixels) and return the
per-mask loss (N,), averaged over pixels for focal, so callers choose the normalisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-mask sigmoid focal loss (RetinaNet), mean over pixels; ``weight`` (N x P or P) masks pixels out."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if weight is None:
        return loss.mean(-1)
    weight = weight.expand_as(loss).to(loss.dtype)
    return (loss * weight).sum(-1) / weight.sum(-1).clamp(min=1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-mask dice loss 1 - (2|p*t| + 1) / (|p| + |t| + 1)."""
    p = logits.sigmoid()
    if weight is not None:
        weight = weight.expand_as(p).to(p.dtype)
        p, targets = p * weight, targets * weight
    num = 2 * (p * targets).sum(-1)
    den = p.sum(-1) + targets.sum(-1)
    return 1 - (num + 1) / (den + 1)


def pairwise_sigmoid_focal_cost(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                                gamma: float = 2.0) -> torch.Tensor:
    """Focal loss of every prediction (N x P) against every target (M x P): N x M, mean over pixels."""
    p = logits.sigmoid()
    pos = alpha * (1 - p) ** gamma * F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits),
                                                                         reduction="none")
    neg = (1 - alpha) * p ** gamma * F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits),
                                                                         reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[-1]


def pairwise_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss of every prediction (N x P) against every target (M x P): N x M."""
    p = logits.sigmoid()
    num = 2 * p @ targets.T
    den = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (num + 1) / (den + 1)
