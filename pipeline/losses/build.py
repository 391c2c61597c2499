"""The one place that maps ``loss.*`` params (:class:`pipeline.config.LossConfig`) to the
criterion's arguments, beside ``pipeline/model/build.py`` for the model. The criteria take
weights and keyword arguments, never the config."""
from __future__ import annotations

import torch

from ..config import Params
from .criterion import SetCriterion
from .matcher import HungarianMatcher


def loss_weights(p: Params) -> dict[str, float]:
    """The weight of each term of :data:`pipeline.losses.criterion.TERMS`; ``loss.pp_weight`` is
    DistLoss's (the params key keeps the name users type)."""
    lc = p.loss
    return {"loss_ce": lc.cls_weight, "loss_mask": lc.focal_weight, "loss_dice": lc.dice_weight,
            "loss_comp": lc.comp_weight, "loss_sim": lc.sim_weight, "loss_dist": lc.pp_weight}


def leaves_parameters_unused(p: Params) -> bool:
    """True when a whole family of losses is off, so that some parameters get no gradient (only
    then must DDP search the graph for unused parameters, which is slower)."""
    w = loss_weights(p)
    no_mask_loss = w["loss_mask"] == 0 and w["loss_dice"] == 0 and w["loss_comp"] == 0 and w["loss_dist"] == 0
    no_class_loss = w["loss_ce"] == 0 and w["loss_dist"] == 0
    return no_mask_loss or no_class_loss


def build_criterion(p: Params, num_classes: int, base_ids: list[int], novel_ids: list[int]) -> SetCriterion:
    lc = p.loss
    matcher = HungarianMatcher(lc.match_class_cost, lc.match_focal_cost, lc.match_dice_cost,
                               lc.focal_alpha, lc.focal_gamma)
    similarity = None
    if lc.sim_weight > 0 or lc.pp_weight > 0:
        from .similarity import DualSimilarityLoss
        similarity = DualSimilarityLoss(p.model.mask_dim, sim_points=lc.sim_points, sim_base_points=lc.sim_base_points,
                                        dist_points=lc.pp_points, dist_form=lc.pp_form, dist_pairing=lc.pp_pairing,
                                        dist_teacher=lc.pp_teacher, simnet_block_convs=lc.simnet_block_convs)
    return SetCriterion(num_classes, matcher, loss_weights(p), num_layers=p.model.dec_layers,
                        deep_supervision=lc.deep_supervision, no_object_weight=lc.no_object_weight,
                        focal_alpha=lc.focal_alpha, focal_gamma=lc.focal_gamma, comp_bg_logit=lc.comp_bg_logit,
                        mask_points=lc.mask_points, dist_start=lc.pp_start, similarity=similarity,
                        base_ids=torch.tensor(base_ids, dtype=torch.long),
                        novel_ids=torch.tensor(novel_ids, dtype=torch.long))
