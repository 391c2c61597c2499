"""The weak-shot set criterion: ClsLoss, MaskLoss and CompLoss with deep supervision,
plus SimLoss and DistLoss (``similarity.py``) on the last decoder layer.

``forward`` returns a dict of named, *unweighted* losses; ``weight_dict`` gives each
name's weight (aux-layer names carry a ``_<layer>`` suffix). The training loop sums
``loss * weight_dict[name]``. A term whose weight is 0 is not computed at all.

Multi-process training: each loss divides a sum over the batch by a count (matched base
masks, images with novel targets, the class weights of the queries). The optional
``normalizer`` hook (``SetCriterion.normalizer``; ``pipeline.engine.distributed.GlobalCount``)
maps a rank's local count to ``(count summed over the ranks) / world_size``, so that the
gradients DDP averages equal the single-process ones of the whole global batch (MaskFormer's
``num_masks`` all-reduce). Without it (the default) the local count is used. Every rank
calls the hook the same number of times, also when its own count is 0 (it is a collective).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LossConfig
from .functional import dice_loss, sigmoid_focal_loss
from .matcher import HungarianMatcher


def _upsample(masks: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=False)


def _denominator(n, normalizer, like: torch.Tensor):
    """The local count ``n``, or ``normalizer(n)`` (see the module docstring) as ``like``'s dtype."""
    if normalizer is None:
        return n
    return normalizer(n, like.device).to(like.dtype)


def classification_loss(pred_logits, targets, indices, num_classes: int, empty_weight: torch.Tensor,
                        normalizer=None):
    """**ClsLoss**: CE over K+1; matched queries take their base or novel label, the rest no-object
    (weighted mean: divided by the sum of the queries' class weights)."""
    b, q = pred_logits.shape[:2]
    target_classes = torch.full((b, q), num_classes, dtype=torch.int64, device=pred_logits.device)
    for i, (src, tgt) in enumerate(indices):
        target_classes[i, src.to(pred_logits.device)] = targets[i]["labels"][tgt.to(targets[i]["labels"].device)]
    if normalizer is not None:
        total = F.cross_entropy(pred_logits.float().transpose(1, 2), target_classes, empty_weight, reduction="sum")
        return total / _denominator(empty_weight[target_classes].sum(), normalizer, total)
    return F.cross_entropy(pred_logits.float().transpose(1, 2), target_classes, empty_weight)


def _point_sample(masks: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """masks N x H x W, coords N x P x 2 in [0, 1] (x, y) -> N x P (bilinear)."""
    grid = coords[:, None] * 2 - 1
    return F.grid_sample(masks[:, None].float(), grid, align_corners=False)[:, 0, 0]


def mask_loss(pred_masks, targets, indices, alpha: float, gamma: float, num_points: int = 0,
              generator: torch.Generator | None = None, normalizer=None):
    """**MaskLoss** (base only): sigmoid focal and dice over matched base masks, each summed over
    masks and divided by the number of base masks in the batch. Returns (focal, dice)."""
    src, tgt = [], []
    for i, (qi, ti) in enumerate(indices):
        keep = ti < targets[i]["num_base"]
        if keep.any():
            src.append(pred_masks[i][qi[keep].to(pred_masks.device)])
            tgt.append(targets[i]["masks"][ti[keep].to(pred_masks.device)])
    if not src:
        if normalizer is not None:      # a collective: take part with a count of 0
            normalizer(0, pred_masks.device)
        zero = pred_masks.sum() * 0.0
        return zero, zero
    src, tgt = torch.cat(src), torch.cat(tgt)
    n = src.shape[0]
    if num_points > 0:     # point-sampled variant (Mask2Former): uniform random points per mask
        coords = torch.rand(n, num_points, 2, generator=generator).to(src.device)
        src_p, tgt_p = _point_sample(src, coords), _point_sample(tgt, coords)
    else:
        src_p = _upsample(src[:, None], tgt.shape[-2:])[:, 0].flatten(1)
        tgt_p = tgt.flatten(1)
    focal = sigmoid_focal_loss(src_p, tgt_p, alpha, gamma).sum()
    n = _denominator(n, normalizer, focal)
    focal = focal / n
    dice = dice_loss(src_p, tgt_p).sum() / n
    return focal, dice


def complementary_loss(pred_masks, targets, indices, bg_logit: float, focal_weight: float, dice_weight: float,
                       alpha: float, gamma: float, normalizer=None):
    """**CompLoss**: for each image with novel targets, P = pixel-wise max over the mask logits of
    the queries matched to novel classes and a constant logit ``bg_logit``; G = 1 - union of the
    base masks; padding excluded; ``focal_weight * focal + dice_weight * dice``, averaged over
    those images."""
    losses = []
    for i, (qi, ti) in enumerate(indices):
        t = targets[i]
        novel = ti >= t["num_base"]
        if not novel.any():
            continue
        size = t["sem_seg"].shape[-2:]
        logits = _upsample(pred_masks[i][qi[novel].to(pred_masks.device)][None], size)[0]   # n x H x W
        const = torch.full_like(logits[:1], bg_logit)
        p = torch.cat([logits, const]).amax(0).flatten()[None]
        base_union = t["masks"].amax(0) if t["num_base"] else torch.zeros(size, device=p.device)
        g = (1 - base_union).flatten()[None]
        w = t["valid"].flatten()[None]
        losses.append(focal_weight * sigmoid_focal_loss(p, g, alpha, gamma, w)
                      + dice_weight * dice_loss(p, g, w))
    if normalizer is not None:
        n = _denominator(len(losses), normalizer, pred_masks.float())    # a collective, also for 0 images
        return torch.cat(losses).sum() / n if losses else pred_masks.sum() * 0.0
    if not losses:
        return pred_masks.sum() * 0.0
    return torch.cat(losses).mean()


class SetCriterion(nn.Module):
    def __init__(self, num_classes: int, matcher: HungarianMatcher, cfg: LossConfig, num_layers: int,
                 similarity: nn.Module | None = None, base_ids: torch.Tensor | None = None,
                 novel_ids: torch.Tensor | None = None):
        super().__init__()
        self.num_classes, self.matcher, self.cfg = num_classes, matcher, cfg
        self.similarity = similarity
        self.normalizer = None      # multi-process training: GlobalCount (see the module docstring)
        empty = torch.ones(num_classes + 1)
        empty[-1] = cfg.no_object_weight
        self.register_buffer("empty_weight", empty)
        self.register_buffer("base_ids", base_ids if base_ids is not None else torch.empty(0, dtype=torch.long))
        self.register_buffer("novel_ids", novel_ids if novel_ids is not None else torch.empty(0, dtype=torch.long))
        layer_weights = {"loss_ce": cfg.cls_weight, "loss_mask": cfg.focal_weight, "loss_dice": cfg.dice_weight,
                         "loss_comp": cfg.comp_weight}
        weights = dict(layer_weights)
        if cfg.deep_supervision:
            for i in range(num_layers - 1):
                weights.update({f"{k}_{i}": v for k, v in layer_weights.items()})
        if similarity is not None:
            weights.update({"loss_sim": cfg.sim_weight, "loss_pp": cfg.pp_weight})
        self.weight_dict = {k: v for k, v in weights.items() if v > 0}

    def layer_losses(self, outputs: dict, targets: list[dict], generator=None) -> tuple[dict, list]:
        cfg = self.cfg
        indices = self.matcher(outputs, targets)
        losses = {}
        if cfg.cls_weight > 0:
            losses["loss_ce"] = classification_loss(outputs["pred_logits"], targets, indices, self.num_classes,
                                                    self.empty_weight, self.normalizer)
        if cfg.focal_weight > 0 or cfg.dice_weight > 0:
            losses["loss_mask"], losses["loss_dice"] = mask_loss(outputs["pred_masks"], targets, indices,
                                                                 cfg.focal_alpha, cfg.focal_gamma,
                                                                 cfg.mask_points, generator, self.normalizer)
        if cfg.comp_weight > 0:
            losses["loss_comp"] = complementary_loss(outputs["pred_masks"], targets, indices, cfg.comp_bg_logit,
                                                     cfg.focal_weight, cfg.dice_weight, cfg.focal_alpha,
                                                     cfg.focal_gamma, self.normalizer)
        return losses, indices

    def forward(self, outputs: dict, targets: list[dict], generator: torch.Generator | None = None,
                step: int | None = None) -> dict:
        """The enabled losses, unweighted. ``step``: the training step (0-based); DistLoss is left
        out before ``loss.pp_start`` (``None``: always in, when its weight is > 0)."""
        losses, _ = self.layer_losses(outputs, targets, generator)
        if self.cfg.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                aux_losses, _ = self.layer_losses(aux, targets, generator)
                losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        if self.similarity is not None:
            kw = {} if self.normalizer is None else {"normalizer": self.normalizer}
            if step is not None and step < self.cfg.pp_start:
                kw["pp_enabled"] = False
            losses.update(self.similarity(outputs, targets, self.base_ids, self.novel_ids, generator, **kw))
        return {k: v for k, v in losses.items() if k in self.weight_dict}

    def total(self, losses: dict) -> torch.Tensor:
        return sum(losses[k] * self.weight_dict[k] for k in losses)
