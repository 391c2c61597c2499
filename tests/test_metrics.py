"""Metrics from a hand-computed confusion matrix (SIMFORMER.md, "Inference and metrics")."""
import json
import math

import numpy as np
import pytest

from pipeline.engine.metrics import ConfusionMatrix, compute_metrics, confusion_matrix, metrics_to_json

IGN = 255


def _pixels():
    """3 classes (0, 1 base; 2 novel) plus 3 ignored pixels.

    Wanted matrix (rows = GT, cols = prediction):
        gt 0: [3, 1, 0]   (4 px)
        gt 1: [1, 2, 1]   (4 px)
        gt 2: [0, 0, 2]   (2 px)
    """
    pairs = ([(0, 0)] * 3 + [(0, 1)] + [(1, 0)] + [(1, 1)] * 2 + [(1, 2)] + [(2, 2)] * 2
             + [(IGN, 0), (IGN, 2), (IGN, 255)])  # ignored: not counted, even a 255 prediction
    gt = np.array([g for g, _ in pairs], dtype=np.uint8).reshape(13, 1)
    pred = np.array([p for _, p in pairs], dtype=np.int64).reshape(13, 1)
    return pred, gt


EXPECTED = np.array([[3, 1, 0], [1, 2, 1], [0, 0, 2]])


def test_confusion_matrix_by_hand():
    pred, gt = _pixels()
    m = confusion_matrix(pred, gt, 3)
    assert m.dtype == np.int64 and m.shape == (3, 3)
    np.testing.assert_array_equal(m, EXPECTED)


def test_confusion_matrix_accepts_torch_and_accumulates():
    torch = pytest.importorskip("torch")
    pred, gt = _pixels()
    acc = ConfusionMatrix(3)
    acc.update(torch.from_numpy(pred), torch.from_numpy(gt))
    acc.update(pred, gt)
    np.testing.assert_array_equal(acc.matrix, 2 * EXPECTED)


def test_metrics_by_hand():
    m = compute_metrics(EXPECTED, base_ids=[0, 1], novel_ids=[2], class_names=["a", "b", "c"])
    # TP = [3, 2, 2]; GT = row sums [4, 4, 2]; pred = column sums [4, 3, 3]
    # union = GT + pred - TP = [5, 5, 3]; IoU = [3/5, 2/5, 2/3]; Acc = TP/GT = [3/4, 2/4, 2/2]
    iou = [3 / 5, 2 / 5, 2 / 3]
    miou_base = (3 / 5 + 2 / 5) / 2 * 100          # 50.0
    miou_novel = (2 / 3) * 100                     # 66.666...
    assert m["mIoU"] == pytest.approx((3 / 5 + 2 / 5 + 2 / 3) / 3 * 100, abs=1e-6)   # 55.5556
    assert m["mIoU_base"] == pytest.approx(50.0, abs=1e-6)
    assert m["mIoU_novel"] == pytest.approx(200 / 3, abs=1e-6)
    assert m["hIoU"] == pytest.approx(2 * miou_base * miou_novel / (miou_base + miou_novel), abs=1e-6)  # 57.142857
    assert m["hIoU"] == pytest.approx(400 / 7, abs=1e-6)
    assert m["pAcc"] == pytest.approx((3 + 2 + 2) / 10 * 100, abs=1e-6)             # 70.0
    assert m["mAcc"] == pytest.approx((3 / 4 + 2 / 4 + 2 / 2) / 3 * 100, abs=1e-6)  # 75.0
    # fwIoU = sum(GT share * IoU) = 0.4*0.6 + 0.4*0.4 + 0.2*(2/3)
    assert m["fwIoU"] == pytest.approx((0.4 * 0.6 + 0.4 * 0.4 + 0.2 * 2 / 3) * 100, abs=1e-6)  # 53.3333
    assert m["pixels"] == 10 and m["num_classes"] == 3 and m["num_valid_classes"] == 3
    pc = m["per_class"]
    assert [c["split"] for c in pc] == ["base", "base", "novel"]
    assert [c["name"] for c in pc] == ["a", "b", "c"]
    for c, want in zip(pc, iou):
        assert c["iou"] == pytest.approx(want * 100, abs=1e-6)
    assert [c["acc"] for c in pc] == pytest.approx([75.0, 50.0, 100.0], abs=1e-6)
    assert [c["gt_pixels"] for c in pc] == [4, 4, 2]
    assert [c["pred_pixels"] for c in pc] == [4, 3, 3]
    for v in [m[k] for k in ("mIoU", "hIoU", "pAcc")] + [pc[0]["iou"]]:
        assert type(v) is float
    # base_ids=None: every class that is not novel
    assert compute_metrics(EXPECTED, None, [2], ["a", "b", "c"])["mIoU_base"] == pytest.approx(50.0)


def test_absent_class_left_out_of_means():
    # class 3 (novel) absent from both GT and prediction; class 4 (base) predicted but never in GT
    conf = np.zeros((5, 5), dtype=np.int64)
    conf[:3, :3] = EXPECTED
    conf[0, 4] = 0
    conf[1, 4] = 1   # one GT-1 pixel predicted as 4
    conf[1, 1] -= 1  # keep row 1 at 4 pixels: [1, 1, 1, 0, 1]
    m = compute_metrics(conf, base_ids=[0, 1, 4], novel_ids=[2, 3], class_names=list("abcde"))
    pc = m["per_class"]
    assert math.isnan(pc[3]["iou"]) and math.isnan(pc[3]["acc"])
    assert pc[4]["iou"] == 0.0 and math.isnan(pc[4]["acc"])      # false-positive class counts as 0
    # IoU: 0: 3/(4+4-3)=0.6, 1: 1/(4+2-1)=0.2, 2: 2/(2+3-2)=2/3, 3: absent, 4: 0/(0+1-0)=0
    assert m["mIoU"] == pytest.approx((0.6 + 0.2 + 2 / 3 + 0.0) / 4 * 100, abs=1e-6)
    assert m["mIoU_base"] == pytest.approx((0.6 + 0.2 + 0.0) / 3 * 100, abs=1e-6)
    assert m["mIoU_novel"] == pytest.approx(200 / 3, abs=1e-6)    # class 3 not averaged in as 0
    assert m["mAcc"] == pytest.approx((3 / 4 + 1 / 4 + 2 / 2) / 3 * 100, abs=1e-6)
    assert m["num_valid_classes"] == 4
    j = metrics_to_json(m)
    assert j["per_class"][3]["iou"] is None
    json.dumps(j, allow_nan=False)


def test_hiou_zero_and_nan():
    conf = np.array([[5, 0], [3, 0]])    # novel class 1 never predicted right: IoU 0
    m = compute_metrics(conf, [0], [1], ["a", "b"])
    assert m["mIoU_novel"] == 0.0 and m["hIoU"] == 0.0
    conf = np.array([[5, 0], [0, 0]])    # novel class absent everywhere: no novel mIoU
    m = compute_metrics(conf, [0], [1], ["a", "b"])
    assert math.isnan(m["mIoU_novel"]) and math.isnan(m["hIoU"])
    assert metrics_to_json(m)["hIoU"] is None


def test_out_of_range_errors():
    gt = np.array([[0, 1], [2, IGN]], dtype=np.uint8)
    with pytest.raises(ValueError, match="prediction"):
        confusion_matrix(np.array([[0, 3], [2, 0]]), gt, 3)
    with pytest.raises(ValueError, match="prediction"):
        confusion_matrix(np.array([[0, -1], [2, 0]]), gt, 3)
    with pytest.raises(ValueError, match="ground truth"):
        confusion_matrix(np.array([[0, 1], [2, 0]]), np.array([[0, 7], [2, 1]]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 3), int), gt, 3)
    with pytest.raises(ValueError, match="both base and novel"):
        compute_metrics(EXPECTED, [0, 1, 2], [2], None)
