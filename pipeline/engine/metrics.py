"""Semantic-segmentation metrics from one confusion matrix (SIMFORMER.md, "Inference and metrics").

Conventions
-----------
* ``conf[g, p]`` counts pixels of ground-truth class ``g`` predicted as ``p`` (rows = GT).
* Pixels whose ground truth is ``ignore_index`` (255) are not counted.
* Per class ``c``: ``TP = conf[c, c]``, ``gt = row sum``, ``pred = column sum``,
  ``IoU = TP / (gt + pred - TP)``, ``Acc = TP / gt``.
* A class absent from both prediction and ground truth has no IoU (NaN) and is left out of
  every IoU mean. A class with no ground-truth pixel has no accuracy (NaN); if it was
  predicted anyway its IoU is 0 and counts in the IoU means (a false positive class).
* ``mIoU`` / ``mIoU_base`` / ``mIoU_novel`` = mean IoU over the valid classes of all / base /
  novel classes; ``hIoU`` = harmonic mean of base and novel mIoU (0 when either is 0, NaN
  when either is NaN); ``pAcc`` = sum(TP) / sum(gt); ``mAcc`` = mean Acc over classes with
  ground truth; ``fwIoU`` = sum over classes with ground truth of gt share * IoU.
* Every figure is in percent. A mean over no valid class is NaN.

``compute_metrics`` returns plain Python floats (NaN where undefined); ``metrics_to_json``
turns NaN into ``None`` so the result can be written as strict JSON (``reports/metrics.json``).
No torch import here: torch tensors are accepted by duck typing.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from ..data import IGNORE

SUMMARY_KEYS = ("mIoU", "mIoU_base", "mIoU_novel", "hIoU", "pAcc", "mAcc", "fwIoU")


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def confusion_matrix(pred, gt, num_classes: int, ignore_index: int = IGNORE) -> np.ndarray:
    """``num_classes x num_classes`` int64 confusion matrix (rows = ground truth, cols = prediction).

    ``pred`` and ``gt`` are integer arrays (numpy or torch) of the same shape. Ground-truth
    pixels equal to ``ignore_index`` are skipped. Any other ground-truth value outside
    ``0..K-1``, or a prediction outside ``0..K-1`` at a counted pixel, raises ``ValueError``
    (a prediction at an ignored pixel is not looked at).
    """
    k = int(num_classes)
    if k <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    p = _to_numpy(pred)
    g = _to_numpy(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    for name, a in (("prediction", p), ("ground truth", g)):
        if a.dtype.kind not in "iub":
            raise ValueError(f"{name} must hold integer class ids, got dtype {a.dtype}")
    g = g.reshape(-1).astype(np.int64, copy=False)
    p = p.reshape(-1).astype(np.int64, copy=False)
    keep = g != ignore_index
    g = g[keep]
    p = p[keep]
    if g.size:
        bad_g = (g < 0) | (g >= k)
        if bad_g.any():
            raise ValueError(f"ground truth holds ids outside 0..{k - 1} (and not the ignore index "
                             f"{ignore_index}): {np.unique(g[bad_g])[:10].tolist()}")
        bad_p = (p < 0) | (p >= k)
        if bad_p.any():
            raise ValueError(f"prediction holds ids outside 0..{k - 1} at {int(bad_p.sum())} counted "
                             f"pixels: {np.unique(p[bad_p])[:10].tolist()}")
    return np.bincount(g * k + p, minlength=k * k).astype(np.int64).reshape(k, k)


class ConfusionMatrix:
    """Accumulates :func:`confusion_matrix` over images: ``update(pred, gt)``, then ``.matrix``."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self._m = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred, gt) -> "ConfusionMatrix":
        self._m += confusion_matrix(pred, gt, self.num_classes, self.ignore_index)
        return self

    @property
    def matrix(self) -> np.ndarray:
        return self._m.copy()

    def compute(self, base_ids, novel_ids, class_names) -> dict:
        return compute_metrics(self._m, base_ids, novel_ids, class_names)


def _pct(x: float) -> float:
    return float(x) * 100.0


def _nanmean(values: np.ndarray) -> float:
    v = values[~np.isnan(values)]
    return float(v.mean()) if v.size else float("nan")


def harmonic_mean(a: float, b: float) -> float:
    """Harmonic mean of two percentages: NaN if either is NaN, 0 if either is 0."""
    if math.isnan(a) or math.isnan(b):
        return float("nan")
    if a <= 0 or b <= 0:
        return 0.0
    return 2.0 * a * b / (a + b)


def _check_split(k: int, base_ids: Iterable[int] | None, novel_ids: Iterable[int]) -> tuple[list[int], list[int]]:
    novel = sorted({int(i) for i in novel_ids})
    base = sorted(set(range(k)) - set(novel)) if base_ids is None else sorted({int(i) for i in base_ids})
    for name, ids in (("base", base), ("novel", novel)):
        out = [i for i in ids if not 0 <= i < k]
        if out:
            raise ValueError(f"{name} class ids outside 0..{k - 1}: {out}")
    both = sorted(set(base) & set(novel))
    if both:
        raise ValueError(f"class ids both base and novel: {both}")
    missing = sorted(set(range(k)) - set(base) - set(novel))
    if missing:
        raise ValueError(f"class ids neither base nor novel: {missing}")
    return base, novel


def compute_metrics(conf, base_ids: Iterable[int] | None, novel_ids: Iterable[int],
                    class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """All metrics of one confusion matrix (see the module docstring for definitions).

    ``base_ids=None`` means every class that is not novel. Returns
    ``{"mIoU", "mIoU_base", "mIoU_novel", "hIoU", "pAcc", "mAcc", "fwIoU",
    "num_classes", "num_valid_classes", "pixels", "per_class": [...]}`` where ``per_class``
    holds one dict per class: ``id, name, split ('base'|'novel'), iou, acc, gt_pixels,
    pred_pixels``. Percentages are floats, NaN where undefined.
    """
    m = np.asarray(_to_numpy(conf), dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {m.shape}")
    k = m.shape[0]
    base, novel = _check_split(k, base_ids, novel_ids)
    if class_names is None:
        class_names = [str(i) for i in range(k)]
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for {k} classes")

    tp = np.diag(m)
    gt = m.sum(axis=1)
    pred = m.sum(axis=0)
    union = gt + pred - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    total = gt.sum()
    has_gt = gt > 0

    miou = _nanmean(iou)
    miou_base = _nanmean(iou[base]) if base else float("nan")
    miou_novel = _nanmean(iou[novel]) if novel else float("nan")
    out: dict[str, Any] = {
        "mIoU": _pct(miou),
        "mIoU_base": _pct(miou_base),
        "mIoU_novel": _pct(miou_novel),
        "hIoU": harmonic_mean(_pct(miou_base), _pct(miou_novel)),
        "pAcc": _pct(tp.sum() / total) if total > 0 else float("nan"),
        "mAcc": _pct(_nanmean(acc)),
        "fwIoU": _pct(float((gt[has_gt] / total * iou[has_gt]).sum())) if total > 0 else float("nan"),
        "num_classes": int(k),
        "num_valid_classes": int((~np.isnan(iou)).sum()),
        "pixels": int(total),
    }
    novel_set = set(novel)
    out["per_class"] = [
        {"id": c, "name": str(class_names[c]), "split": "novel" if c in novel_set else "base",
         "iou": _pct(iou[c]), "acc": _pct(acc[c]), "gt_pixels": int(gt[c]), "pred_pixels": int(pred[c])}
        for c in range(k)
    ]
    return out


def _json_value(v):
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def metrics_to_json(m: dict) -> dict:
    """Copy of ``m`` with NaN/inf replaced by ``None`` and numpy scalars made plain (strict JSON)."""
    return _json_value(m)


CONFUSION_COLUMNS = ("actual", "predicted", "count", "actual_id", "predicted_id")


def confusion_pairs(conf, class_names: Iterable[str] | None = None) -> list[dict]:
    """The K x K confusion matrix (rows ground truth) as one row per (actual, predicted) pair that
    occurs: class names, the pixel ``count`` and both ids (``reports/confusion.csv``, drawn by
    ``dvc plots`` as a heatmap). Pairs that never occur are left out: at most K x K rows."""
    conf = _to_numpy(conf).astype(np.int64)
    names = list(class_names) if class_names is not None else []
    name = (lambda i: str(names[i]) if i < len(names) else str(i))
    rows, cols = np.nonzero(conf)
    return [{"actual": name(int(a)), "predicted": name(int(b)), "count": int(conf[a, b]), "actual_id": int(a),
             "predicted_id": int(b)} for a, b in zip(rows, cols)]
