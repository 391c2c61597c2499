"""The headroom control: loss.pp_teacher (DistLoss's teacher chosen by name) and the oracle teacher,
which distils the true same-class relation of the sampled pixel pairs (novel masks: a diagnostic)."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.ablation import cell_params, novel_mask_variants
from pipeline.config import ConfigError, build_ablation, build_params, novel_mask_use
from pipeline.data.targets import weak_shot_targets
from pipeline.losses.build import build_criterion
from pipeline.losses.similarity import (DIST_TEACHERS, DualSimilarityLoss, dist_loss, oracle_teacher,
                                        pixel_pair_distillation)
from pipeline.tracking import novel_mask_tags
from tests.conftest import file_params

torch.set_num_threads(1)


class CountingSim(torch.nn.Module):
    """Stand-in SimNet: p = sigmoid(<f_a, f_b>), counting its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, f_a, f_b):
        self.calls += 1
        return torch.sigmoid((f_a * f_b).sum(1))


def _batch():
    """Two 1 x 2 images; classes 0..6 (+ no-object), base {0..4}, novel {5, 6}. Image a: pixels
    (novel 5, unknown 255); image b: (base 0, novel 5)."""
    q0 = [0.05, 0.05, 0.05, 0.05, 0.05, 0.6, 0.1, 0.05]
    q1 = [0.05, 0.05, 0.05, 0.05, 0.05, 0.1, 0.5, 0.15]
    logits = torch.log(torch.tensor([[q0, q1], [q0, q1]]))
    l3 = math.log(3)
    masks = torch.tensor([[[[l3, 0.0]], [[0.0, l3]]],
                          [[[0.0, 0.0]], [[0.0, -l3]]]])
    feats = torch.tensor([[[[1.0, 2.0]]], [[[0.5, -1.0]]]])
    ones = torch.ones(1, 2, dtype=torch.bool)
    targets = [{"sem_seg": torch.tensor([[5, 255]]), "valid": ones, "novel_ids": torch.tensor([5])},
               {"sem_seg": torch.tensor([[0, 5]]), "valid": ones, "novel_ids": torch.tensor([5])}]
    return {"pred_logits": logits, "pred_masks": masks, "mask_features": feats}, targets


def _cos(u, v):
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


SA0 = [0.6 * 0.75 + 0.1 * 0.5, 0.1 * 0.75 + 0.5 * 0.5]      # novel score vector of a's pixel 0
SB1 = [0.6 * 0.5 + 0.1 * 0.25, 0.1 * 0.5 + 0.5 * 0.25]      # ... of b's pixel 1
BASE, NOVEL = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5, 6])


def test_teachers_by_name_match_the_params_choices():
    from pipeline.config import PP_TEACHERS
    assert tuple(DIST_TEACHERS) == PP_TEACHERS == ("simnet", "oracle")


def test_oracle_teacher_is_the_true_relation_and_leaves_ignore_pairs_out():
    la, lb = torch.tensor([5, 255, 6]), torch.tensor([5, 6, 0])
    ((t, valid),) = oracle_teacher(None, torch.zeros(1, 1, 1, 1), [(0, 1, None, None, la, lb)])
    assert t.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    assert valid.tolist() == [[True, True, True], [False, False, False], [True, True, True]]


def test_dist_loss_oracle_hand_value_no_simnet_call():
    """a's candidates: pixel 0 (novel 5) and pixel 1 (255); b's only candidate: pixel 1 (novel 5).
    The oracle teacher is 1 on (a0, b1) and absent on (a1, b1): the loss is the cce of the two
    (a0, b1) pairs alone, -log(1 + s) with s = ReLU(cos(s(a0), s(b1)))."""
    outputs, targets = _batch()
    net = CountingSim()
    loss = dist_loss(net, outputs, targets, BASE, NOVEL, dist_points=2, dist_form="cce",
                     generator=torch.Generator().manual_seed(0), dist_teacher="oracle")
    s = max(_cos(SA0, SB1), 0.0)
    assert loss.item() == pytest.approx(-0.5 * math.log(1 + s), rel=1e-5)
    assert net.calls == 0


def test_dist_loss_simnet_teacher_is_the_default():
    outputs, targets = _batch()
    a = dist_loss(CountingSim(), outputs, targets, BASE, NOVEL, 2, generator=torch.Generator().manual_seed(0))
    b = dist_loss(CountingSim(), outputs, targets, BASE, NOVEL, 2, generator=torch.Generator().manual_seed(0),
                  dist_teacher="simnet")
    assert torch.equal(a, b)


def test_dist_loss_oracle_gradients_reach_the_predictions_only():
    outputs, targets = _batch()
    for k in ("pred_logits", "pred_masks", "mask_features"):
        outputs[k].requires_grad_(True)
    dist_loss(CountingSim(), outputs, targets, BASE, NOVEL, 4, generator=torch.Generator().manual_seed(0),
              dist_teacher="oracle").backward()
    assert outputs["pred_masks"].grad.abs().sum() > 0
    assert outputs["mask_features"].grad is None


def test_unknown_teacher_refused():
    outputs, targets = _batch()
    with pytest.raises(ValueError, match="dist_teacher 'simnett'.*simnet, oracle"):
        dist_loss(CountingSim(), outputs, targets, BASE, NOVEL, 2, dist_teacher="simnett")
    with pytest.raises(ValueError, match="dist_teacher"):
        DualSimilarityLoss(4, dist_teacher="none")


def test_masked_distillation_mean_over_valid_pairs():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[0.5, 0.2], [0.3, 0.9]])
    v = torch.tensor([[True, False], [False, False]])
    assert pixel_pair_distillation(t, s, "cce", v).item() == pytest.approx(-0.5 * math.log(1.5))
    assert pixel_pair_distillation(t, s, "cce", torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0


def test_pp_teacher_typo_refused_with_the_key_named():
    with pytest.raises(ConfigError, match=r"params key 'loss\.pp_teacher': 'orcale' is not allowed; allowed values: "
                                          r"simnet, oracle"):
        build_params(file_params({"loss": {"pp_teacher": "orcale"}}))
    raw = file_params({"ablation": {"variants": {"bad": {"loss": {"pp_teacher": "none"}}}}})
    with pytest.raises(ConfigError, match=r"ablation variant 'bad'.*loss\.pp_teacher"):
        cell_params(raw, build_ablation(raw["ablation"]), "bad", 6)


def test_build_criterion_threads_the_teacher_and_default_is_simnet():
    p = build_params(file_params())
    assert p.loss.pp_teacher == "simnet"
    crit = build_criterion(p, 24, list(range(18)), list(range(18, 24)))
    assert crit.similarity.dist_teacher == "simnet"
    raw = file_params()
    grid = build_ablation(raw["ablation"])
    cell = cell_params(raw, grid, "full_oracle_teacher", 6)
    assert cell.loss.pp_teacher == "oracle" and cell.loss.pp_weight > 0 and cell.loss.sim_weight > 0
    assert build_criterion(cell, 24, list(range(18)), list(range(18, 24))).similarity.dist_teacher == "oracle"


def test_runs_that_use_novel_masks_are_named_and_tagged():
    raw = file_params()
    grid = build_ablation(raw["ablation"])
    main = build_params(raw)
    assert novel_mask_use(main) is None and novel_mask_tags(main) == {}
    oracle_teacher_cell = cell_params(raw, grid, "full_oracle_teacher", 6)
    assert novel_mask_tags(oracle_teacher_cell) == {"diagnostic": "uses novel masks (oracle teacher)"}
    assert novel_mask_use(cell_params(raw, grid, "oracle", 6)) == "fully supervised oracle"
    # with DistLoss off the oracle teacher reads nothing
    off = build_params(file_params({"loss": {"pp_teacher": "oracle", "pp_weight": 0.0}}))
    assert novel_mask_use(off) is None
    grid2 = build_ablation({**raw["ablation"], "run": ["full", "full_oracle_teacher", "oracle", "pp0"]})
    assert novel_mask_variants(raw, grid2) == {"full_oracle_teacher": "oracle teacher",
                                               "oracle": "fully supervised oracle"}


def test_training_targets_hide_novel_masks_but_keep_the_full_label_map():
    """The oracle teacher reads targets[i]["sem_seg"] - the crop's full label map - while the weak-shot
    targets give masks of base classes only."""
    seg = torch.tensor([[[0, 0, 5], [5, 6, 255]]])
    valid = torch.ones_like(seg, dtype=torch.bool)
    (t,) = weak_shot_targets(seg, valid, torch.tensor([0, 1]), torch.tensor([5, 6]))
    assert t["labels"].tolist() == [0, 5, 6] and t["num_base"] == 1 and t["masks"].shape[0] == 1
    assert torch.equal(t["sem_seg"], seg[0])          # novel pixels kept: the oracle's truth
    assert t["novel_ids"].tolist() == [5, 6]
