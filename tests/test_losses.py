import math

import pytest
import torch

from pipeline.data.targets import weak_shot_targets
from pipeline.losses.criterion import classification_loss, complementary_loss, mask_loss
from pipeline.losses.functional import dice_loss, sigmoid_focal_loss

LN3 = math.log(3.0)


def test_sigmoid_focal_by_hand():
    # p = [0.5, 0.75], t = [1, 0]: alpha_t * (1 - p_t)^2 * CE
    v = sigmoid_focal_loss(torch.tensor([[0.0, LN3]]), torch.tensor([[1.0, 0.0]]))
    expected = (0.25 * 0.25 * math.log(2) + 0.75 * 0.5625 * math.log(4)) / 2
    assert v.shape == (1,) and v.item() == pytest.approx(expected, abs=1e-6)        # 0.3140824


def test_dice_by_hand():
    v = dice_loss(torch.tensor([[0.0, LN3]]), torch.tensor([[1.0, 0.0]]))
    assert v.item() == pytest.approx(1 - 2 / 3.25, abs=1e-6)                          # 0.3846154


def test_cls_loss_by_hand():
    # Query 0 matched to class 1 (p = 2/4 -> CE ln 2), query 1 unmatched -> no-object,
    # uniform logits -> CE ln 3 with class weight 0.1: (ln2 + 0.1 ln3) / 1.1
    logits = torch.tensor([[[0.0, math.log(2.0), 0.0], [0.0, 0.0, 0.0]]])
    targets = [{"labels": torch.tensor([1])}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    w = torch.tensor([1.0, 1.0, 0.1])
    v = classification_loss(logits, targets, indices, num_classes=2, empty_weight=w)
    assert v.item() == pytest.approx((math.log(2) + 0.1 * LN3) / 1.1, abs=1e-6)     # 0.7300080


def test_mask_loss_base_only_normalised():
    pred = torch.tensor([[[[0.0, LN3]], [[5.0, 5.0]]]])          # 1 x 2 queries x 1 x 2
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.tensor([[[1.0, 0.0]]]), "num_base": 1}]
    # query 0 -> base target 0, query 1 -> novel target 1 (no mask: ignored by MaskLoss)
    indices = [(torch.tensor([0, 1]), torch.tensor([0, 1]))]
    focal, dice = mask_loss(pred, targets, indices, 0.25, 2.0)
    assert focal.item() == pytest.approx((0.25 * 0.25 * math.log(2) + 0.75 * 0.5625 * math.log(4)) / 2, abs=1e-6)
    assert dice.item() == pytest.approx(0.3846154, abs=1e-6)


def test_complementary_loss_by_hand():
    # Novel query logits [0, ln3]; constant -2.9444 is below both -> P = [0, ln3].
    # Base union [1, 0] -> G = [0, 1]. focal: p=[.5,.75], t=[0,1]
    pred = torch.tensor([[[[0.0, LN3]], [[9.0, 9.0]]]])
    t = {"labels": torch.tensor([0, 1]), "masks": torch.tensor([[[1.0, 0.0]]]), "num_base": 1,
         "sem_seg": torch.tensor([[0, 1]]), "valid": torch.tensor([[True, True]])}
    indices = [(torch.tensor([1, 0]), torch.tensor([0, 1]))]       # query 0 matched to the novel target
    v = complementary_loss(pred, [t], indices, -2.9444, 20.0, 1.0, 0.25, 2.0)
    focal = (0.75 * 0.25 * math.log(2) + 0.25 * 0.0625 * math.log(4 / 3)) / 2      # 0.0672301
    dice = 1 - (2 * 0.75 + 1) / (1.25 + 1 + 1)                                     # 0.2307692
    assert v.item() == pytest.approx(20 * focal + dice, abs=1e-5)                   # 1.5753712
    # The constant logit takes over where novel queries are confident of "no".
    low = torch.tensor([[[[-9.0, -9.0]], [[9.0, 9.0]]]])
    v_low = complementary_loss(low, [t], indices, -2.9444, 20.0, 1.0, 0.25, 2.0)
    v_const = complementary_loss(torch.full_like(low, -2.9444), [t], indices, -2.9444, 20.0, 1.0, 0.25, 2.0)
    assert v_low.item() == pytest.approx(v_const.item(), abs=1e-6)
    # Padding excluded: only pixel 0 counts when pixel 1 is padding.
    t_pad = dict(t, valid=torch.tensor([[True, False]]))
    v_pad = complementary_loss(pred, [t_pad], indices, -2.9444, 20.0, 1.0, 0.25, 2.0)
    dice_pad = 1 - (0 + 1) / (0.5 + 0 + 1)
    assert v_pad.item() == pytest.approx(20 * 0.75 * 0.25 * math.log(2) + dice_pad, abs=1e-5)


def test_complementary_loss_zero_without_novel_targets():
    pred = torch.randn(1, 2, 1, 2, requires_grad=True)
    t = {"labels": torch.tensor([0]), "masks": torch.tensor([[[1.0, 0.0]]]), "num_base": 1,
         "sem_seg": torch.tensor([[0, 255]]), "valid": torch.ones(1, 2, dtype=torch.bool)}
    v = complementary_loss(pred, [t], [(torch.tensor([0]), torch.tensor([0]))], -2.9444, 20, 1, 0.25, 2)
    assert v.item() == 0.0


def test_weak_shot_targets_base_first_novel_without_masks():
    seg = torch.tensor([[[3, 3, 1], [0, 255, 1]]])
    valid = torch.ones_like(seg, dtype=torch.bool)
    (t,) = weak_shot_targets(seg, valid, base_ids=torch.tensor([0, 2, 3]), novel_ids=torch.tensor([1, 4]))
    assert t["labels"].tolist() == [0, 3, 1] and t["num_base"] == 2
    assert t["masks"].shape == (2, 2, 3)
    assert t["masks"][1].tolist() == [[1, 1, 0], [0, 0, 0]]
    assert t["novel_ids"].tolist() == [1]
    (o,) = weak_shot_targets(seg, valid, torch.tensor([0, 2, 3]), torch.tensor([1, 4]), supervise_novel_masks=True)
    assert o["labels"].tolist() == [0, 3, 1] and o["num_base"] == 3 and o["novel_ids"].numel() == 0
