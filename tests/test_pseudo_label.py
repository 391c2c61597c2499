import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.pseudo_label import pseudo_label  # noqa: E402


def test_pseudo_label_rule_exact():
    base = [0, 1, 2]
    image_novel = [5]
    gt = np.array([[0, 1, 5],
                   [6, 255, 2],
                   [5, 255, 7]], dtype=np.uint8)
    pred = np.array([[3, 5, 5],
                     [5, 5, 6],
                     [6, 3, 7]], dtype=np.int64)
    expected = np.array([[0, 1, 5],          # base GT kept (whatever the prediction); novel GT + pred 5 -> 5
                         [5, 5, 2],          # non-base GT (6, 255) + pred 5 in image labels -> 5; base 2 kept
                         [255, 255, 255]],   # pred 6 / 3 (base) / 7 not in the image's novel labels -> 255
                        dtype=np.uint8)
    out = pseudo_label(pred, gt, base, image_novel)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_pseudo_label_shape_mismatch():
    with pytest.raises(ValueError):
        pseudo_label(np.zeros((2, 2), int), np.zeros((2, 3), np.uint8), [0], [1])
