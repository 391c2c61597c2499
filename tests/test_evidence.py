"""What the benchmark's evidence rests on: trivial baselines, the AUC diagnostic, per-term
gradient norms, paired confidence intervals, and the synthetic data's unlabelled regions."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from pipeline.data import synthetic as S
from pipeline.engine.baselines import nearest_colour, trivial_baselines
from pipeline.engine.diagnostics import loss_gradient_norms, novel_pair_auc, pair_auc
from pipeline.report.stats import paired_difference


# ----------------------------------------------------------------------------- baselines
def _write(root, rel, rgb=None, lab=None):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if rgb is not None:
        assert cv2.imwrite(str(path), np.asarray(rgb, np.uint8)[:, :, ::-1])
    else:
        assert cv2.imwrite(str(path), np.asarray(lab, np.uint8))
    return rel


@pytest.fixture
def tiny_dataset(tmp_path):
    """3 classes (0 red, 1 green, 2 blue), 2 train images and 1 test image of 2 x 2 (PNG: exact)."""
    R = tmp_path
    train = [
        ([[(255, 0, 0), (250, 0, 0)], [(0, 255, 0), (9, 9, 9)]], [[0, 0], [1, 255]]),
        ([[(0, 0, 255), (245, 0, 0)], [(0, 245, 0), (0, 0, 250)]], [[2, 0], [1, 2]]),
    ]
    # the test image's second pixel is green but labelled 2: nearest colour says 1
    test = [([[(240, 10, 10), (10, 240, 10)], [(10, 10, 240), (100, 100, 100)]], [[0, 2], [2, 255]])]
    index = {"train": [], "test": []}
    for part, items in (("train", train), ("test", test)):
        for i, (rgb, lab) in enumerate(items):
            index[part].append({"image": _write(R, f"img/{part}{i}.png", rgb=rgb),
                                "label": _write(R, f"lab/{part}{i}.png", lab=lab), "usable": True})
    split = {"num_classes": 3, "base": [0, 1], "novel": [2], "class_names": ["red", "green", "blue"]}
    return R, index, split


def test_trivial_baselines_on_a_hand_made_dataset(tiny_dataset):
    root, index, split = tiny_dataset
    out = trivial_baselines(root, index, split)
    # fitted: class pixel counts 3 / 2 / 2 (the 255 pixel is not fitted) -> majority class 0
    assert out["fit"] == {"train_images": 2, "test_images": 1, "majority_class": 0, "classes_fitted": 3}
    maj = out["majority"]     # gt 0 -> 0 once, gt 2 -> 0 twice; class 1 absent from gt and prediction
    assert maj["mIoU"] == pytest.approx(100 / 6)          # (1/3 + 0) / 2 valid classes
    assert maj["mIoU_base"] == pytest.approx(100 / 3)
    assert maj["mIoU_novel"] == pytest.approx(0.0)
    assert maj["pAcc"] == pytest.approx(100 / 3)
    nmc = out["nearest_colour"]   # predictions 0, 1, 2: IoU 1, 0, 1/2
    assert nmc["mIoU"] == pytest.approx(50.0)
    assert nmc["mIoU_base"] == pytest.approx(50.0)
    assert nmc["mIoU_novel"] == pytest.approx(50.0)
    assert nmc["pAcc"] == pytest.approx(200 / 3)


def test_nearest_colour_picks_the_nearest_mean():
    means = np.array([[250.0, 0, 0], [0, 250.0, 0]])
    img = np.array([[[200, 90, 0], [90, 200, 0]]], np.uint8)
    assert nearest_colour(img, means, np.array([4, 7])).tolist() == [[4, 7]]


def test_trivial_baselines_reject_labels_outside_the_classes(tiny_dataset):
    root, index, split = tiny_dataset
    split = dict(split, num_classes=2, base=[0, 1], novel=[], class_names=["red", "green"])
    with pytest.raises(ValueError, match=r"label 2 in '.*train1\.png' is not a class id 0\.\.1 or 255"):
        trivial_baselines(root, index, split)


# ----------------------------------------------------------------------------- AUC, gradient norms
def test_pair_auc_hand_computed():
    # positives 0.9, 0.3; negatives 0.8, 0.1: 3 of the 4 (pos, neg) orderings are right
    assert pair_auc([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0]) == pytest.approx(0.75)
    assert pair_auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)           # a tie counts one half
    assert pair_auc([0.2, 0.9], [1, 0]) == pytest.approx(0.0)
    assert math.isnan(pair_auc([0.1, 0.2], [1, 1]))
    with pytest.raises(ValueError, match="differ in shape"):
        pair_auc([0.1, 0.2], [1])


def test_novel_pair_auc_student_perfect_and_inverted():
    """Two 1 x 2 images, novel classes 3 (left) and 4 (right); one query per class with a mask
    on its own column: the student's score vectors separate the classes perfectly."""
    h, w = 1, 2
    masks = torch.full((2, 2, h, w), -20.0)
    masks[:, 0, :, 0] = 20.0           # query 0 covers the left pixel
    masks[:, 1, :, 1] = 20.0           # query 1 covers the right pixel
    logits = torch.full((2, 2, 6), -20.0)
    logits[:, 0, 3] = 20.0             # query 0 says class 3, query 1 class 4
    logits[:, 1, 4] = 20.0
    sem = torch.tensor([[3, 4]])
    targets = [{"sem_seg": sem, "valid": torch.ones(1, 2, dtype=torch.bool)}] * 2
    outputs = {"pred_logits": logits, "pred_masks": masks, "mask_features": torch.randn(2, 4, h, w)}
    g = torch.Generator().manual_seed(0)
    out = novel_pair_auc(None, outputs, targets, torch.tensor([3, 4]), points=16, generator=g)
    assert out["auc_student"] == pytest.approx(1.0)
    assert math.isnan(out["auc_simnet"])
    assert out["novel_pairs"] == 256.0
    # a constant teacher ranks nothing: AUC 0.5
    class Const(torch.nn.Module):
        def forward(self, a, b):
            return torch.full((a.shape[0],), 0.7)
    out = novel_pair_auc(Const(), outputs, targets, torch.tensor([3, 4]), points=16, generator=g)
    assert out["auc_simnet"] == pytest.approx(0.5)


def test_novel_pair_auc_without_novel_pixels_is_nan():
    outputs = {"pred_logits": torch.zeros(2, 1, 4), "pred_masks": torch.zeros(2, 1, 2, 2),
               "mask_features": torch.zeros(2, 3, 2, 2)}
    targets = [{"sem_seg": torch.zeros(2, 2, dtype=torch.long)}] * 2
    out = novel_pair_auc(None, outputs, targets, torch.tensor([2]))
    assert math.isnan(out["auc_student"]) and out["novel_pairs"] == 0.0


def test_loss_gradient_norms_weighted_grouped_and_detached():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    x = w * 1.0
    losses = {"loss_ce": x.sum(),                 # d/dw = (1, 1)
              "loss_ce_0": x.sum(),               # aux copy: adds (1, 1) -> ClsLoss grad (2, 2) * 0.5
              "loss_mask": (x ** 2).sum(),        # d/dw = 2w = (6, 8), weight 20; dice adds (1, 1) * 1
              "loss_dice": x.sum(),
              "loss_sim": x.detach().sum() + torch.zeros((), requires_grad=True)}   # detached: norm 0
    weights = {"loss_ce": 0.5, "loss_ce_0": 0.5, "loss_mask": 20.0, "loss_dice": 1.0, "loss_sim": 1.0}
    g = loss_gradient_norms(losses, weights, [w])
    assert g["grad_ClsLoss"] == pytest.approx(math.sqrt(2.0))
    assert g["grad_MaskLoss"] == pytest.approx(math.hypot(121.0, 161.0))
    assert g["grad_SimLoss"] == 0.0
    assert w.grad is None                         # nothing accumulated into .grad


# ----------------------------------------------------------------------------- paired CI
def test_paired_difference_hand_computed():
    a = {1: 10.0, 2: 12.0, 3: 11.0, 9: 50.0}      # seed 9 has no partner: left out
    b = {1: 8.0, 2: 9.0, 3: 10.0}
    d = paired_difference(a, b)                   # differences 2, 3, 1: mean 2, sd 1
    half = 4.302652729911275 / math.sqrt(3)       # t(0.975, 2 df) * sd / sqrt(n)
    assert d["n"] == 3 and d["seeds"] == [1, 2, 3]
    assert d["mean"] == pytest.approx(2.0) and d["std"] == pytest.approx(1.0)
    assert d["ci_low"] == pytest.approx(2.0 - half) and d["ci_high"] == pytest.approx(2.0 + half)
    assert d["p_value"] == pytest.approx(0.07417990, rel=1e-5)


def test_paired_difference_with_one_pair_has_no_interval():
    d = paired_difference({1: 3.0}, {1: 1.0, 2: 0.0})
    assert d["n"] == 1 and d["mean"] == 2.0 and math.isnan(d["ci_low"]) and math.isnan(d["std"])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference({1: 1.0}, {1: 1.0}, confidence=1.5)


# ----------------------------------------------------------------------------- unlabelled regions
def test_unlabelled_regions_are_255_in_both_splits_and_never_a_class():
    fractions = {}
    for split in ("train", "test"):
        ign = []
        for i in range(60):
            rgb, lab = S.generate_sample(S.sample_rng(6, split, i), 64)
            vals = set(np.unique(lab).tolist())
            assert vals <= set(range(S.NUM_CLASSES)) | {255}
            ign.append(float((lab == 255).mean()))
        fractions[split] = float(np.mean(ign))
        assert 0.10 <= fractions[split] <= 0.25, fractions
        assert sum(f > 0 for f in ign) >= 40          # most images hold some unlabelled pixels
    assert 255 not in [c["id"] for c in S.CLASSES]


def test_many_images_hold_several_novel_classes():
    novel = set(S.SPLITS[1])
    with_novel = several = 0
    for i in range(100):
        _, lab = S.generate_sample(S.sample_rng(6, "train", i), 64)
        k = len(set(np.unique(lab).tolist()) & novel)
        with_novel += k >= 1
        several += k >= 2
    assert several / with_novel >= 0.55


def test_report_calls_a_model_short_of_the_convergence_target_a_quick_look():
    from pipeline.report.evidence import quick_look_banner
    base = {"nearest_colour": {"mIoU": 36.8, "pAcc": 60.7}}
    text = quick_look_banner({"mIoU": 18.5, "pAcc": 41.3}, base)
    assert text.startswith("> **Quick look, not a result:**")
    assert "mIoU (18.5 < 36.8) and pAcc (41.3 < 60.7)" in text
    # above the colour baseline, below the target (pAcc >= 80 and mIoU >= 2 x 36.8 = 73.6)
    text = quick_look_banner({"mIoU": 48.0, "pAcc": 75.0}, base)
    assert text.startswith("> **Quick look:** the main model beats the trivial baselines")
    assert "73.6): pAcc 75.0, mIoU 48.0" in text
    assert quick_look_banner({"mIoU": 73.5, "pAcc": 90.0}, base) != ""     # mIoU just short
    assert quick_look_banner({"mIoU": 73.6, "pAcc": 79.9}, base) != ""     # pAcc just short
    assert quick_look_banner({"mIoU": 73.6, "pAcc": 80.0}, base) == ""


# ----------------------------------------------------------------------------- training times
def test_training_time_table_gives_steps_threads_and_seconds(tmp_path):
    import pandas as pd

    from pipeline.report.evidence import training_time_markdown
    rows = []
    for variant, seed, secs, threads, shared in (("full", 6, 120.0, None, True), ("full", 7, 170.0, 1, False),
                                                 ("baseline", 6, 100.0, 1, False), ("baseline", 7, 110.0, 1, False)):
        d = tmp_path / f"{variant}-{seed}"
        d.mkdir()
        pd.DataFrame({"step": [400, 800], "seconds": [secs / 2, secs]}).to_csv(d / "curve.csv", index=False)
        rows.append({"variant": variant, "seed": seed, "cell_dir": str(d), "torch_threads": threads,
                     "shared_with_main": shared})
    main = pd.DataFrame({"step": [800], "seconds": [120.4]})
    assert training_time_markdown(pd.DataFrame(rows), main).splitlines() == [
        "| run | steps | torch threads | training time (s) |", "|---|---|---|---|",
        "| main model | 800 | (train stage) | 120 |",
        "| full (2 cells) | 800 | 1 | 145 mean (120-170) |",          # the shared cell's threads are the main's
        "| baseline (2 cells) | 800 | 1 | 105 mean (100-110) |"]
