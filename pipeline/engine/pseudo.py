"""SimFormer's optional second stage: pseudo-label the training set with the trained model,
then retrain fully supervised on those labels.

Rule (``pipeline.data.pseudo_label.pseudo_label``): base pixels keep their ground truth;
every other pixel takes the predicted class when it is one of the image's novel labels,
else 255.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import cv2
import numpy as np
import torch

from ..config import Params, params_hash
from ..data import IGNORE
from ..data.pseudo_label import pseudo_label
from ..io import atomic_dir
from .evaluate import evaluate


def label_training_set(model: torch.nn.Module, dataset_dir: str | Path, index: dict, split: dict,
                       out_dir: str | Path, device: torch.device, short_edge: int = 0, max_edge: int = 0,
                       progress: bool = True) -> dict:
    """Write ``<out_dir>/<entry label path>`` for every train entry; returns pseudo-label statistics.

    Also measures (the synthetic data has full ground truth) how many pseudo-labelled novel
    pixels agree with the true label: a diagnostic, never used for training.
    """
    entries = index["train"]
    names = [Path(e["image"]).stem for e in entries]
    by_name = dict(zip(names, entries))
    stats = {"images": 0, "novel_pixels": 0, "novel_correct": 0, "ignore_pixels": 0, "pixels": 0}
    with atomic_dir(out_dir) as tmp:
        def write(name: str, pred: np.ndarray, gt: np.ndarray) -> None:
            e = by_name[name]
            lab = pseudo_label(pred, gt, split["base"], e["novel"])
            dst = tmp / e["label"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(dst), lab):
                raise OSError(f"cannot write pseudo label '{dst}'")
            novel = np.isin(lab, split["novel"])
            stats["images"] += 1
            stats["novel_pixels"] += int(novel.sum())
            stats["novel_correct"] += int((lab[novel] == gt[novel]).sum())
            stats["ignore_pixels"] += int((lab == IGNORE).sum())
            stats["pixels"] += lab.size

        evaluate(model, dataset_dir, entries, split["num_classes"], device, short_edge, max_edge,
                 progress=progress, on_prediction=write)
    stats["novel_precision"] = 100.0 * stats["novel_correct"] / max(stats["novel_pixels"], 1)
    return stats


def retrain_params(p: Params) -> Params:
    """Fully supervised MaskFormer on pseudo labels: novel classes get masks, no weak-shot losses."""
    loss = dataclasses.replace(p.loss, oracle=True, comp_weight=0.0, sim_weight=0.0, pp_weight=0.0)
    train = dataclasses.replace(p.train, iterations=p.pseudo.iterations or p.train.iterations)
    return dataclasses.replace(p, loss=loss, train=train)


def retrain_hash(p: Params) -> str:
    """Distinct from an oracle run with equal params: this one trains on pseudo labels."""
    return hashlib.sha256(f"pseudo:{params_hash(retrain_params(p))}".encode()).hexdigest()[:16]
