"""Trivial baselines every model is shown beside (computed on every prepared dataset).

* ``majority``: every pixel gets the most frequent class of the training labels.
* ``nearest_colour``: every pixel gets the class whose mean RGB colour over the training
  pixels is nearest (squared Euclidean distance). Fitted on train with **all** classes, novel
  masks included: a reference for how far colour alone goes, not a weak-shot method.

Both are scored on the test split with the same confusion matrix and metrics as the models
(``metrics.compute_metrics``); unlabelled pixels (255) are neither fitted nor scored.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..data import IGNORE
from ..data.dataset import read_image, read_label
from .metrics import compute_metrics, confusion_matrix


def _subsample(entries: list[dict], cap: int) -> list[dict]:
    """At most ``cap`` entries, evenly spaced (deterministic); all when ``cap`` is 0."""
    if cap <= 0 or len(entries) <= cap:
        return entries
    keep = np.linspace(0, len(entries) - 1, cap).round().astype(int)
    return [entries[i] for i in keep]


def fit_colour_statistics(root: Path, entries: list[dict], num_classes: int,
                          progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per class: pixel count (K,) and RGB sum (K x 3) over the labelled pixels of ``entries``."""
    counts = np.zeros(num_classes, np.int64)
    sums = np.zeros((num_classes, 3), np.float64)
    for e in tqdm(entries, desc="baselines: fit", unit="img", disable=not progress, dynamic_ncols=True):
        img = read_image(root / e["image"])
        lab = read_label(root / e["label"], img.shape[:2]).reshape(-1).astype(np.int64)
        keep = lab != IGNORE
        if (lab[keep] >= num_classes).any():
            bad = int(lab[keep][lab[keep] >= num_classes][0])
            raise ValueError(f"label {bad} in '{root / e['label']}' is not a class id 0..{num_classes - 1} or 255")
        lab = lab[keep]
        rgb = img.reshape(-1, 3)[keep].astype(np.float64)
        counts += np.bincount(lab, minlength=num_classes)
        for c in range(3):
            sums[:, c] += np.bincount(lab, weights=rgb[:, c], minlength=num_classes)
    return counts, sums


def nearest_colour(img: np.ndarray, means: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """H x W class ids: for each pixel the id (from ``ids``) of the nearest row of ``means``."""
    x = img.reshape(-1, 3).astype(np.float32)
    m = means.astype(np.float32)
    # ||x - m||^2 = ||x||^2 - 2 x.m + ||m||^2; ||x||^2 does not change the argmin
    d = (m * m).sum(1)[None, :] - 2.0 * (x @ m.T)
    return ids[np.argmin(d, axis=1)].reshape(img.shape[:2])


def trivial_baselines(root: str | Path, index: dict, split: dict, max_train_images: int = 2000,
                      progress: bool = False) -> dict[str, dict]:
    """``{"majority": metrics, "nearest_colour": metrics}`` on the test split (metrics as
    ``compute_metrics`` returns them, without ``per_class``), plus ``"fit"``: what was fitted."""
    root = Path(root)
    k = int(split["num_classes"])
    train = _subsample([e for e in index["train"] if e.get("usable", True)], max_train_images)
    if not train:
        raise ValueError(f"no usable training images in the index of '{root}' to fit the baselines on")
    if not index["test"]:
        raise ValueError(f"no test images in the index of '{root}' to score the baselines on")
    counts, sums = fit_colour_statistics(root, train, k, progress)
    if counts.sum() == 0:
        raise ValueError(f"the {len(train)} training labels under '{root}' hold no labelled pixel")
    present = np.flatnonzero(counts > 0)
    means = sums[present] / counts[present, None]
    majority = int(np.argmax(counts))
    conf = {"majority": np.zeros((k, k), np.int64), "nearest_colour": np.zeros((k, k), np.int64)}
    for e in tqdm(index["test"], desc="baselines: score", unit="img", disable=not progress, dynamic_ncols=True):
        img = read_image(root / e["image"])
        gt = read_label(root / e["label"], img.shape[:2])
        conf["majority"] += confusion_matrix(np.full(gt.shape, majority, np.int64), gt, k)
        conf["nearest_colour"] += confusion_matrix(nearest_colour(img, means, present), gt, k)
    out: dict[str, dict] = {}
    for name, m in conf.items():
        met = compute_metrics(m, split["base"], split["novel"], split.get("class_names"))
        met.pop("per_class")
        out[name] = met
    out["fit"] = {"train_images": len(train), "test_images": len(index["test"]),
                  "majority_class": majority, "classes_fitted": int(len(present))}
    return out
