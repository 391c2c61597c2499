"""The weak-shot set criterion: ClsLoss, MaskLoss and CompLoss with deep supervision,
plus SimLoss and DistLoss (``similarity.py``) on the last decoder layer.

``forward`` returns a dict of named, *unweighted* losses; ``weight_dict`` gives each
name's weight (aux-layer names carry a ``_<layer>`` suffix). The training loop sums
``loss * weight_dict[name]``. A term whose weight is 0 is not computed at all. The names, one
per paper term (:data:`TERMS`), are those of the logs, the curves and the report.
``pipeline/losses/build.py`` is the one place that maps ``loss.*`` params to these arguments.

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

from typing import Mapping

from .functional import dice_loss, sigmoid_focal_loss
from .matcher import HungarianMatcher


# the paper's name of each term of the criterion (aux-layer copies ``loss_ce_0`` ... count with their term)
TERMS = {"loss_ce": "ClsLoss", "loss_mask": "MaskLoss", "loss_dice": "MaskLoss", "loss_comp": "CompLoss",
         "loss_sim": "SimLoss", "loss_dist": "DistLoss"}
LAYER_TERMS = ("loss_ce", "loss_mask", "loss_dice", "loss_comp")     # per decoder layer (deep supervision)


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
    """The weak-shot criterion. ``weights``: the weight of each term of :data:`TERMS` (0 or missing =
    off; ``loss_sim`` / ``loss_dist`` need ``similarity``, the :class:`~.similarity.DualSimilarityLoss`).
    ``dist_start``: the training step from which DistLoss is on."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weights: Mapping[str, float], *,
                 num_layers: int, deep_supervision: bool, no_object_weight: float, focal_alpha: float,
                 focal_gamma: float, comp_bg_logit: float, mask_points: int = 0, dist_start: int = 0,
                 similarity: nn.Module | None = None, base_ids: torch.Tensor | None = None,
                 novel_ids: torch.Tensor | None = None):
        super().__init__()
        unknown = sorted(set(weights) - set(TERMS))
        if unknown:
            raise ValueError(f"unknown loss term {unknown[0]!r}; terms: {', '.join(TERMS)}")
        self.num_classes, self.matcher, self.similarity = num_classes, matcher, similarity
        self.focal_alpha, self.focal_gamma, self.comp_bg_logit = focal_alpha, focal_gamma, comp_bg_logit
        self.mask_points, self.dist_start = mask_points, dist_start
        self.weights = {k: float(weights.get(k, 0.0)) for k in TERMS}
        self.normalizer = None      # multi-process training: GlobalCount (see the module docstring)
        empty = torch.ones(num_classes + 1)
        empty[-1] = no_object_weight
        self.register_buffer("empty_weight", empty)
        self.register_buffer("base_ids", base_ids if base_ids is not None else torch.empty(0, dtype=torch.long))
        self.register_buffer("novel_ids", novel_ids if novel_ids is not None else torch.empty(0, dtype=torch.long))
        layer_weights = {k: self.weights[k] for k in LAYER_TERMS}
        all_weights = dict(layer_weights)
        if deep_supervision:
            for i in range(num_layers - 1):
                all_weights.update({f"{k}_{i}": v for k, v in layer_weights.items()})
        self.deep_supervision = deep_supervision
        if similarity is not None:
            all_weights.update({"loss_sim": self.weights["loss_sim"], "loss_dist": self.weights["loss_dist"]})
        self.weight_dict = {k: v for k, v in all_weights.items() if v > 0}

    def layer_losses(self, outputs: dict, targets: list[dict], generator=None) -> tuple[dict, list]:
        w = self.weights
        indices = self.matcher(outputs, targets)
        losses = {}
        if w["loss_ce"] > 0:
            losses["loss_ce"] = classification_loss(outputs["pred_logits"], targets, indices, self.num_classes,
                                                    self.empty_weight, self.normalizer)
        if w["loss_mask"] > 0 or w["loss_dice"] > 0:
            losses["loss_mask"], losses["loss_dice"] = mask_loss(outputs["pred_masks"], targets, indices,
                                                                 self.focal_alpha, self.focal_gamma,
                                                                 self.mask_points, generator, self.normalizer)
        if w["loss_comp"] > 0:
            losses["loss_comp"] = complementary_loss(outputs["pred_masks"], targets, indices, self.comp_bg_logit,
                                                     w["loss_mask"], w["loss_dice"], self.focal_alpha,
                                                     self.focal_gamma, self.normalizer)
        return losses, indices

    def forward(self, outputs: dict, targets: list[dict], generator: torch.Generator | None = None,
                step: int | None = None) -> dict:
        """The enabled losses, unweighted. ``step``: the training step (0-based); DistLoss is left
        out before ``dist_start`` (``None``: always in, when its weight is > 0)."""
        losses, _ = self.layer_losses(outputs, targets, generator)
        if self.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                aux_losses, _ = self.layer_losses(aux, targets, generator)
                losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        if self.similarity is not None:
            kw = {} if self.normalizer is None else {"normalizer": self.normalizer}
            dist_on = self.weights["loss_dist"] > 0 and (step is None or step >= self.dist_start)
            losses.update(self.similarity(outputs, targets, self.base_ids, self.novel_ids, generator,
                                          sim_enabled=self.weights["loss_sim"] > 0, dist_enabled=dist_on, **kw))
        return {k: v for k, v in losses.items() if k in self.weight_dict}

    def total(self, losses: dict) -> torch.Tensor:
        return sum(losses[k] * self.weight_dict[k] for k in losses)
