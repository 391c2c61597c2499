import math

import torch

from pipeline.losses.matcher import HungarianMatcher


def _targets(labels, num_base, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"labels": torch.tensor(labels, dtype=torch.long),
            "masks": (torch.rand(num_base, h, w, generator=g) > 0.5).float(), "num_base": num_base}


def test_batched_equals_per_image():
    torch.manual_seed(0)
    b, q, k = 3, 6, 5
    outputs = {"pred_logits": torch.randn(b, q, k + 1), "pred_masks": torch.randn(b, q, 4, 4)}
    targets = [_targets([0, 2, 4], 2, seed=1), _targets([1], 1, seed=2), _targets([3, 0], 0, seed=3)]
    m = HungarianMatcher()
    batched = m(outputs, targets)
    for i in range(b):
        single = m({"pred_logits": outputs["pred_logits"][i:i + 1], "pred_masks": outputs["pred_masks"][i:i + 1]},
                   [targets[i]])[0]
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])
    assert [len(x[0]) for x in batched] == [3, 1, 2]


def test_empty_targets():
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_masks": torch.randn(2, 4, 4, 4)}
    empty = {"labels": torch.empty(0, dtype=torch.long), "masks": torch.empty(0, 8, 8), "num_base": 0}
    out = HungarianMatcher()(outputs, [empty, empty])
    assert all(len(r) == 0 and len(c) == 0 for r, c in out)
    out = HungarianMatcher()(outputs, [empty, _targets([1], 1)])
    assert len(out[0][0]) == 0 and len(out[1][0]) == 1


def test_known_class_cost_gives_known_assignment():
    # Novel targets only: cost = -p(class). Query 2 is sure of class 0, query 0 of class 1.
    big = 10.0
    logits = torch.zeros(1, 3, 3)
    logits[0, 0, 1] = big
    logits[0, 2, 0] = big
    tgt = {"labels": torch.tensor([0, 1]), "masks": torch.empty(0, 4, 4), "num_base": 0}
    rows, cols = HungarianMatcher()({"pred_logits": logits, "pred_masks": torch.zeros(1, 3, 4, 4)}, [tgt])[0]
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 2: 0}


def test_cost_matrix_values_and_novel_rule():
    # One query, one base target and one novel target, 1x2 pixels.
    logits = torch.tensor([[[0.0, math.log(3.0), 0.0]]])          # p = [0.2, 0.6, 0.2]
    masks = torch.tensor([[[[0.0, math.log(3.0)]]]])              # sigmoid = [0.5, 0.75]
    tgt = {"labels": torch.tensor([1, 0]), "masks": torch.tensor([[[1.0, 0.0]]]), "num_base": 1}
    m = HungarianMatcher(cost_class=1.0, cost_focal=20.0, cost_dice=1.0)
    c = m.cost_matrix(logits, masks, [tgt])[0, 0]
    focal = (0.25 * 0.25 * math.log(2) + 0.75 * 0.5625 * math.log(4)) / 2     # 0.3140824
    dice = 1 - (2 * 0.5 + 1) / (1.25 + 1 + 1)                               # 0.3846154
    assert torch.allclose(c[0], torch.tensor(-0.6 + 20 * focal + dice), atol=1e-5)
    assert torch.allclose(c[1], torch.tensor(-0.2), atol=1e-6)      # novel: class cost only
    c2 = m.cost_matrix(logits, -masks, [tgt])[0, 0]
    assert torch.allclose(c2[1], c[1]) and not torch.allclose(c2[0], c[0])


def test_mask_cost_at_prediction_resolution():
    # A 2x2 target mask seen by 1x1 predicted masks: nearest downsampling keeps its top-left pixel.
    logits = torch.zeros(1, 2, 2)
    masks = torch.tensor([[[[5.0]], [[-5.0]]]])                 # query 0 says "on", query 1 "off"
    on = {"labels": torch.tensor([0]), "masks": torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), "num_base": 1}
    off = {"labels": torch.tensor([0]), "masks": torch.tensor([[[0.0, 1.0], [1.0, 1.0]]]), "num_base": 1}
    m = HungarianMatcher()
    assert m({"pred_logits": logits, "pred_masks": masks}, [on])[0][0].tolist() == [0]
    assert m({"pred_logits": logits, "pred_masks": masks}, [off])[0][0].tolist() == [1]
