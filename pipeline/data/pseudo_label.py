"""Pseudo labels for SimFormer's optional retraining stage.

After weak-shot training, the train set is relabelled: base pixels keep their ground truth
(base masks are known), and every other pixel takes the model's prediction when that
prediction is one of the image's novel labels (its image-level labels), else 255 (ignore).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from . import IGNORE


def pseudo_label(pred: np.ndarray, gt: np.ndarray, base_ids: Iterable[int], image_novel_ids: Iterable[int]) -> np.ndarray:
    """``H x W`` uint8 pseudo label.

    * ``gt`` in ``base_ids`` -> ``gt``;
    * otherwise (novel ground truth, or 255) -> ``pred`` when ``pred`` is in
      ``image_novel_ids``, else 255.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must be the same H x W shape")
    base = np.asarray(sorted({int(c) for c in base_ids}), dtype=np.int64)
    novel = np.asarray(sorted({int(c) for c in image_novel_ids}), dtype=np.int64)
    gt64 = gt.astype(np.int64)
    pred64 = pred.astype(np.int64)
    out = np.full(gt.shape, IGNORE, dtype=np.uint8)
    take_pred = np.isin(pred64, novel) & (pred64 >= 0) & (pred64 < IGNORE)
    out[take_pred] = pred64[take_pred].astype(np.uint8)
    is_base = np.isin(gt64, base)
    out[is_base] = gt64[is_base].astype(np.uint8)
    return out
