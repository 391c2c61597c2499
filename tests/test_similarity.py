"""SimLoss / DistLoss / SimNet: hand-computed values, validity rule, gradient routing."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataclasses import replace  # noqa: E402

from pipeline.config import build_params  # noqa: E402
from tests.helpers import file_params  # noqa: E402
from pipeline.losses.similarity import (DualSimilarityLoss, SimilarityStats, class_balanced_bce,  # noqa: E402
                                        dist_loss, downsample_labels, novel_score_map,
                                        pixel_pair_distillation, sample_similarity_points, sim_loss,
                                        similarity_targets)
from pipeline.model.simnet import SimNet  # noqa: E402

torch.set_num_threads(1)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


class DotSim(torch.nn.Module):
    """Stand-in SimNet with a closed form: p = sigmoid(<f_a, f_b>)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, f_a, f_b):
        self.calls += 1
        return torch.sigmoid((f_a * f_b).sum(1))


# ---------------------------------------------------------------- SimNet
def test_simnet_shapes_and_probability():
    torch.manual_seed(0)
    net = SimNet(8, width=16)
    fa, fb = torch.randn(5, 8), torch.randn(5, 8)
    p = net(fa, fb)
    assert p.shape == (5,)
    assert torch.all((p >= 0) & (p <= 1))
    assert torch.allclose(p, torch.softmax(net.logits(fa, fb), 1)[:, 1])
    assert len(net.blocks) == 3
    with pytest.raises(ValueError):
        net(torch.randn(5, 7), torch.randn(5, 7))


def test_simnet_released_block_two_linear_bn_hand_value():
    """block_convs=2: y = ReLU(x + BN(W2 ReLU(BN(W1 x)))), checked against the formula in eval mode."""
    torch.manual_seed(0)
    net = SimNet(4, width=6, num_blocks=1, block_convs=2).eval()
    block = net.blocks[0]
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    bns = [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(linears) == 2 and len(bns) == 2
    for bn in bns:                       # non-trivial running statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, 6)

    def bn(m, v):
        return (v - m.running_mean) / torch.sqrt(m.running_var + m.eps) * m.weight + m.bias
    expected = torch.relu(x + bn(bns[1], torch.relu(bn(bns[0], x @ linears[0].weight.T)) @ linears[1].weight.T))
    assert torch.allclose(block(x), expected, atol=1e-6)
    # the paper's block has one linear + BN: 2 x 6 x 6 weights fewer per block
    n = lambda m: sum(q.numel() for q in m.parameters())  # noqa: E731
    assert n(SimNet(4, 6, 3, block_convs=2)) - n(SimNet(4, 6, 3)) == 3 * (6 * 6 + 2 * 6)
    with pytest.raises(ValueError, match="block_convs=3"):
        SimNet(4, 6, 3, block_convs=3)


# ---------------------------------------------------------------- targets and validity
def test_similarity_targets_hand_made():
    base = torch.tensor([0, 1, 2])              # 5 and 7 are novel
    la = torch.tensor([0, 5, 255, 7])
    lb = torch.tensor([0, 5, 7])
    target, valid = similarity_targets(la, lb, base)
    assert target.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]]
    # base row: all valid; novel rows: only with the base column; ignore row: nothing
    assert valid.tolist() == [[True, True, True],
                              [True, False, False],
                              [False, False, False],
                              [True, False, False]]


def test_class_balanced_bce_hand_value_and_no_valid():
    st = SimilarityStats()
    st.pos.fill_(2.0)
    st.neg.fill_(6.0)
    loss = class_balanced_bce(torch.tensor([0.8, 0.4, 0.9]), torch.tensor([1.0, 0.0, 0.0]),
                              torch.tensor([True, True, False]), st)
    # this call: 1 positive, 1 negative -> totals pos 3, neg 7 (of 10)
    assert (st.pos.item(), st.neg.item()) == (3.0, 7.0)
    w_pos, w_neg = 7 / 10, 3 / 10
    expected = (w_pos * -math.log(0.8) + w_neg * -math.log(1 - 0.4)) / 2     # = 0.154724...
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.1547241, rel=1e-5)
    assert set(st.state_dict()) == {"pos", "neg"}
    fresh = SimilarityStats()
    z = class_balanced_bce(torch.tensor([0.3]), torch.tensor([1.0]), torch.tensor([False]), fresh)
    assert z.item() == 0.0 and fresh.pos.item() == 0.0


# ---------------------------------------------------------------- sampling
def test_sample_points_shared_base_class_and_rest():
    base = torch.tensor([0, 1, 2])
    la = torch.full((8, 8), 5)
    la[:4] = 0
    la[4:, :2] = 1
    la[7, 7] = 255
    lb = torch.full((8, 8), 6)
    lb[:, :3] = 1
    lb[:, 3] = 2
    g = torch.Generator().manual_seed(0)
    ia, ib = sample_similarity_points(la, lb, base, 20, 16, g)
    assert ia.shape == ib.shape == (20,)
    fa, fb = la.flatten(), lb.flatten()
    assert (fa[ia[:16]] == 1).all() and (fb[ib[:16]] == 1).all()      # the only shared base class is 1
    assert ((fa[ia[16:]] != 1) & (fa[ia[16:]] != 255)).all()
    assert (fb[ib[16:]] != 1).all()
    g2 = torch.Generator().manual_seed(0)
    ia2, ib2 = sample_similarity_points(la, lb, base, 20, 16, g2)
    assert torch.equal(ia, ia2) and torch.equal(ib, ib2)


def test_sample_points_no_shared_base_uses_any_base():
    base = torch.tensor([0, 1])
    la = torch.tensor([0, 0, 5, 5])
    lb = torch.tensor([1, 6, 6, 6])
    ia, ib = sample_similarity_points(la, lb, base, 4, 2, torch.Generator().manual_seed(1))
    assert sorted(la[ia[:2]].tolist()) == [0, 0] and lb[ib[:2]].tolist() == [1, 1]
    assert la[ia[2:]].tolist() == [5, 5] and set(lb[ib[2:]].tolist()) == {6}


def test_downsample_labels_nearest_and_padding():
    sem = torch.zeros(4, 8, dtype=torch.long)
    sem[:, 4:] = 5
    valid = torch.ones(4, 8, dtype=torch.bool)
    valid[:, 4:] = False
    assert downsample_labels(sem, (1, 2)).tolist() == [[0, 5]]
    assert downsample_labels(sem, (1, 2), valid).tolist() == [[0, 255]]


# ---------------------------------------------------------------- SimLoss
def _sim_batch():
    # crop 4 x 8 -> feature map 1 x 2 (nearest picks columns 0 and 4)
    sem_a = torch.zeros(4, 8, dtype=torch.long)
    sem_a[:, 4:] = 5                       # pixels: [base 0, novel 5]
    sem_b = torch.zeros(4, 8, dtype=torch.long)
    sem_b[:, 4:] = 1                       # pixels: [base 0, base 1]
    ones = torch.ones(4, 8, dtype=torch.bool)
    targets = [{"sem_seg": sem_a, "valid": ones, "novel_ids": torch.tensor([5]), "base_ids": torch.tensor([0])},
               {"sem_seg": sem_b, "valid": ones, "novel_ids": torch.tensor([5]), "base_ids": torch.tensor([0, 1])}]
    feats = torch.tensor([[[[1.0, 2.0]]], [[[0.5, -1.0]]]])      # B=2, C=1, 1 x 2
    return feats, targets


def test_sim_loss_hand_value():
    feats, targets = _sim_batch()
    base = torch.tensor([0, 1, 2])
    stats = SimilarityStats()
    # 2 points per image, 1 from the shared base class 0: the sampling is forced
    # a = [pix0 (0), pix1 (5)], b = [pix0 (0), pix1 (1)]; all 4 cross pairs valid:
    #   (0,0) pos, f=1*0.5  ; (0,1) neg, f=1*-1 ; (5,0) neg, f=2*0.5 ; (5,1) neg (1 is base), f=2*-1
    loss = sim_loss(DotSim(), feats, targets, base, stats, num_points=2, num_base_points=1,
                    generator=torch.Generator().manual_seed(0))
    w_pos, w_neg = 3 / 4, 1 / 4            # totals: 1 positive, 3 negatives
    expected = (w_pos * -math.log(sig(0.5)) + w_neg * -math.log(1 - sig(-1.0))
                + w_neg * -math.log(1 - sig(1.0)) + w_neg * -math.log(1 - sig(-2.0))) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert (stats.pos.item(), stats.neg.item()) == (1.0, 3.0)


def test_sim_loss_gradients_only_to_simnet():
    torch.manual_seed(0)
    feats = torch.randn(4, 6, 8, 8, requires_grad=True)        # stands for the mask features
    sem = [torch.randint(0, 4, (32, 32)) for _ in range(4)]
    targets = [{"sem_seg": s, "valid": torch.ones(32, 32, dtype=torch.bool)} for s in sem]
    net = SimNet(6, width=16)
    loss = sim_loss(net, feats * 2.0, targets, torch.tensor([0, 1]), SimilarityStats(), 10, 8,
                    torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert feats.grad is None
    assert all(p.grad is not None for p in net.parameters())
    assert any(p.grad.abs().sum() > 0 for p in net.parameters())


# ---------------------------------------------------------------- DistLoss pieces
def test_novel_score_map_hand_value():
    p0 = [0.1, 0.2, 0.3, 0.4]
    p1 = [0.25, 0.25, 0.25, 0.25]
    logits = torch.log(torch.tensor([[p0, p1]]))               # softmax(log p) = p
    masks = torch.tensor([[[[0.0, math.log(3)]], [[math.log(3), 0.0]]]])   # sigmoid: 0.5 / 0.75
    s = novel_score_map(logits, masks, torch.tensor([2]))
    assert s.shape == (1, 1, 1, 2)
    # pixel 0: 0.3*0.5 + 0.25*0.75 = 0.3375 ; pixel 1: 0.3*0.75 + 0.25*0.5 = 0.35
    assert s.flatten().tolist() == pytest.approx([0.3375, 0.35], rel=1e-5)


def test_pixel_pair_distillation_cce_hand_value():
    t = torch.tensor([[0.9, 0.2], [0.5, 0.0]])
    s = torch.tensor([[0.6, 0.3], [0.1, 0.8]])
    # (0.9,0.6): -0.4*log(1.6); (0.2,0.3): -0.3*log(2-0.3); (0.5,0.1): 0; (0.0,0.8): -0.5*log(2-0.8)
    expected = (-0.4 * math.log(1.6) - 0.3 * math.log(1.7) + 0.0 - 0.5 * math.log(1.2)) / 4
    assert expected == pytest.approx(-0.1095877, rel=1e-5)
    assert pixel_pair_distillation(t, s, "cce").item() == pytest.approx(expected, rel=1e-5)


def test_pixel_pair_distillation_ce_hand_value():
    t = torch.tensor([[0.9, 0.2], [0.5, 0.0]])
    s = torch.tensor([[0.6, 0.3], [0.1, 0.8]])
    expected = (-(0.9 * math.log(0.6) + 0.1 * math.log(0.4)) - (0.2 * math.log(0.3) + 0.8 * math.log(0.7))
                - (0.5 * math.log(0.1) + 0.5 * math.log(0.9)) - (0.0 + 1.0 * math.log(0.2))) / 4
    assert pixel_pair_distillation(t, s, "ce").item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        pixel_pair_distillation(t, s, "mse")


def _dist_batch(requires_grad=False):
    # classes 0..6 + no-object (index 7); base {0,1,2,3,4}, novel {5,6}
    q0 = [0.05, 0.05, 0.05, 0.05, 0.05, 0.6, 0.1, 0.05]
    q1 = [0.05, 0.05, 0.05, 0.05, 0.05, 0.1, 0.5, 0.15]
    logits = torch.log(torch.tensor([[q0, q1], [q0, q1]]))
    l3 = math.log(3)
    masks = torch.tensor([[[[l3, 0.0]], [[0.0, l3]]],         # image a: q0 -> .75,.5 ; q1 -> .5,.75
                          [[[0.0, 0.0]], [[0.0, -l3]]]])      # image b: q0 -> .5,.5  ; q1 -> .5,.25
    feats = torch.tensor([[[[1.0, 2.0]]], [[[0.5, -1.0]]]])
    if requires_grad:
        logits.requires_grad_(True)
        masks.requires_grad_(True)
        feats.requires_grad_(True)
    ones = torch.ones(1, 2, dtype=torch.bool)
    targets = [{"sem_seg": torch.tensor([[5, 255]]), "valid": ones, "novel_ids": torch.tensor([5])},
               {"sem_seg": torch.tensor([[0, 5]]), "valid": ones, "novel_ids": torch.tensor([5])}]
    return {"pred_logits": logits, "pred_masks": masks, "mask_features": feats}, targets


def _cos(u, v):
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def _cce(t, s):
    return -max(t - 0.5, 0) * math.log(1 + s) - max(0.5 - t, 0) * math.log(2 - s)


# novel score vectors [s_5, s_6] by hand:
SA0 = [0.6 * 0.75 + 0.1 * 0.5, 0.1 * 0.75 + 0.5 * 0.5]      # [0.5, 0.325]
SA1 = [0.6 * 0.5 + 0.1 * 0.75, 0.1 * 0.5 + 0.5 * 0.75]      # [0.375, 0.425]
SB1 = [0.6 * 0.5 + 0.1 * 0.25, 0.1 * 0.5 + 0.5 * 0.25]      # [0.325, 0.175]
# teacher: image a's two non-base pixels (features 1, 2) vs image b's only non-base pixel (-1)
T0, T1 = sig(1.0 * -1.0), sig(2.0 * -1.0)


def test_dist_loss_cross_image_hand_value():
    outputs, targets = _dist_batch()
    base, novel = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5, 6])
    # b has one candidate pixel: both of its 2 points are pixel 1; a's two points are pixels 0, 1
    # in some order (the mean over pairs does not depend on it).
    loss = dist_loss(DotSim(), outputs, targets, base, novel, dist_points=2, dist_form="cce",
                     dist_pairing="cross_image", generator=torch.Generator().manual_seed(0))
    expected = (2 * _cce(T0, _cos(SA0, SB1)) + 2 * _cce(T1, _cos(SA1, SB1))) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dist_loss_within_image_hand_value():
    outputs, targets = _dist_batch()
    base, novel = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5, 6])
    # student[i, j] = cos(a_i, a_j) (within image a); teacher[i, j] = T(a_i, b_j) = T_i
    loss = dist_loss(DotSim(), outputs, targets, base, novel, dist_points=2, dist_form="cce",
                     dist_pairing="within_image", generator=torch.Generator().manual_seed(0))
    c01 = _cos(SA0, SA1)
    expected = (_cce(T0, 1.0) + _cce(T0, c01) + _cce(T1, c01) + _cce(T1, 1.0)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dist_loss_skips_pairs_without_shared_novel():
    outputs, targets = _dist_batch()
    targets[1]["novel_ids"] = torch.tensor([6])
    net = DotSim()
    loss = dist_loss(net, outputs, targets, torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5, 6]), 2)
    assert loss.item() == 0.0 and net.calls == 0


def test_dist_loss_gradients_reach_predictions_not_simnet():
    torch.manual_seed(0)
    outputs, targets = _dist_batch(requires_grad=True)
    net = SimNet(1, width=8)
    loss = dist_loss(net, outputs, targets, torch.tensor([0, 1, 2, 3, 4]), torch.tensor([5, 6]), 4,
                     generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert outputs["pred_logits"].grad is not None and outputs["pred_logits"].grad.abs().sum() > 0
    assert outputs["pred_masks"].grad is not None and outputs["pred_masks"].grad.abs().sum() > 0
    assert outputs["mask_features"].grad is None
    assert all(p.grad is None for p in net.parameters())


# ---------------------------------------------------------------- module
def _random_batch(b=4, c=6, h=8, q=5, k=6):
    g = torch.Generator().manual_seed(1)
    outputs = {"pred_logits": torch.randn(b, q, k + 1, generator=g, requires_grad=True),
               "pred_masks": torch.randn(b, q, h, h, generator=g, requires_grad=True),
               "mask_features": torch.randn(b, c, h, h, generator=g, requires_grad=True)}
    targets = []
    for i in range(b):
        sem = torch.randint(0, k, (4 * h, 4 * h), generator=g)
        sem[:, -4:] = 255                                   # padding
        valid = torch.ones(4 * h, 4 * h, dtype=torch.bool)
        valid[:, -4:] = False
        targets.append({"sem_seg": sem, "valid": valid, "novel_ids": torch.tensor([4, 5]),
                        "base_ids": torch.tensor([0, 1, 2, 3])})
    return outputs, targets


def _count_calls(module):
    calls = []
    module.simnet.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("sw,pw,n_calls,keys", [(0.0, 0.0, 0, set()), (1.0, 0.0, 1, {"loss_sim"}),
                                                (0.0, 0.5, 1, {"loss_dist"}), (1.0, 0.5, 2, {"loss_sim", "loss_dist"})])
def test_criterion_computes_the_weighted_similarity_terms_only(sw, pw, n_calls, keys):
    """The criterion's weights (loss.sim_weight, loss.pp_weight) say which similarity terms run:
    a term of weight 0 makes no SimNet call; the weights are the criterion's only."""
    from pipeline.data.targets import weak_shot_targets
    from pipeline.losses.build import build_criterion
    p = build_params(file_params())
    p = replace(p, model=replace(p.model, mask_dim=6), loss=replace(p.loss, sim_weight=sw, pp_weight=pw, sim_points=10,
                                                                    sim_base_points=8, pp_points=10))
    torch.manual_seed(0)
    crit = build_criterion(p, 6, [0, 1, 2, 3], [4, 5])
    assert (crit.similarity is None) == (sw == pw == 0)
    calls = _count_calls(crit.similarity) if crit.similarity is not None else []
    outputs, raw = _random_batch()
    targets = weak_shot_targets(torch.stack([t["sem_seg"] for t in raw]), torch.stack([t["valid"] for t in raw]),
                                torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5]))
    out = crit(outputs, targets, torch.Generator().manual_seed(0))
    assert set(out) & {"loss_sim", "loss_dist"} == keys
    assert len(calls) == n_calls
    assert all(torch.isfinite(v) for v in out.values())
    assert {k: crit.weight_dict[k] for k in keys} == {k: w for k, w in (("loss_sim", sw), ("loss_dist", pw)) if w}
    assert not hasattr(crit.similarity, "weight_dict") and not hasattr(crit.similarity, "pp_weight")


def test_dual_loss_flags_and_builder_arguments():
    p = build_params(file_params())
    p = replace(p, model=replace(p.model, mask_dim=6),
                loss=replace(p.loss, sim_points=100, sim_base_points=80, pp_points=100, pp_form="cce",
                             pp_pairing="cross_image"))
    from pipeline.losses.build import build_criterion
    crit = build_criterion(p, 6, [0, 1, 2, 3], [4, 5]).similarity
    assert len([m for m in crit.simnet.blocks[0].modules() if isinstance(m, torch.nn.Linear)]) == \
        p.loss.simnet_block_convs
    assert (crit.sim_points, crit.sim_base_points, crit.dist_points, crit.dist_form, crit.dist_pairing) == \
        (100, 80, 100, "cce", "cross_image")
    calls = _count_calls(crit)
    outputs, targets = _random_batch()
    out = crit(outputs, targets, torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5]),
               torch.Generator().manual_seed(0), sim_enabled=False, dist_enabled=False)
    assert out == {} and not calls


def test_criterion_leaves_dist_loss_out_before_pp_start():
    """loss.pp_start = 5: steps 0-4 have no DistLoss (and no teacher call), step 5 on has it."""
    from pipeline.data.targets import weak_shot_targets
    from pipeline.losses.build import build_criterion
    p = build_params(file_params())
    p = replace(p, model=replace(p.model, mask_dim=6),
                loss=replace(p.loss, pp_start=5, pp_weight=0.5, sim_points=10, sim_base_points=8, pp_points=10))
    torch.manual_seed(0)
    crit = build_criterion(p, 6, [0, 1, 2, 3], [4, 5])
    calls = _count_calls(crit.similarity)
    outputs, raw = _random_batch()
    targets = weak_shot_targets(torch.stack([t["sem_seg"] for t in raw]), torch.stack([t["valid"] for t in raw]),
                                torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5]))
    keys = {}
    for step in (0, 4, 5, None):
        n = len(calls)
        keys[step] = set(crit(outputs, targets, torch.Generator().manual_seed(0), step=step))
        keys[step, "simnet calls"] = len(calls) - n
    assert "loss_dist" not in keys[0] and "loss_dist" not in keys[4] and "loss_sim" in keys[0]
    assert keys[5] == keys[None] == keys[0] | {"loss_dist"}
    assert (keys[0, "simnet calls"], keys[5, "simnet calls"]) == (1, 2)      # SimLoss; SimLoss + teacher
    assert crit.weight_dict["loss_dist"] == 0.5


def test_dual_loss_deterministic_with_generator():
    outputs, targets = _random_batch()
    vals = []
    for _ in range(2):
        torch.manual_seed(0)
        crit = DualSimilarityLoss(6, sim_points=10, sim_base_points=8, dist_points=10, simnet_width=16)
        out = crit(outputs, targets, torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5]),
                   torch.Generator().manual_seed(3))
        vals.append((out["loss_sim"].item(), out["loss_dist"].item()))
    assert vals[0] == vals[1]
