"""Semantic inference over the test split and the confusion matrix it yields."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import Params, build_params
from ..data.dataset import TestImages, worker_init
from ..model import build_model, semantic_inference
from .checkpoint import load_checkpoint
from .metrics import ConfusionMatrix


def load_trained(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, Params, dict]:
    """Rebuild the model from the train stage's exported file."""
    ck = load_checkpoint(path)
    p = build_params(ck["params"])
    model = build_model(p.model, ck["num_classes"])
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), p, ck["split"]


def resample_scores(scores: torch.Tensor, valid: tuple[int, int], padded: tuple[int, int],
                    out: tuple[int, int], rows: slice = slice(None)) -> torch.Tensor:
    """K x h' x w' class scores of a zero-padded input -> K x R x W scores at the output size
    ``out`` (``rows`` of it: predict resamples big images in strips). Bilinear
    (``align_corners=False``) from the region of the padded input holding the (resized) image:
    ``valid`` of ``padded`` pixels. Evaluation and predict both label with this, so one image
    gets one labelling whatever the test-time resize."""
    (vh, vw), (ph, pw), (oh, ow) = valid, padded, out
    r0, r1, _ = rows.indices(oh)
    xs = (torch.arange(ow, dtype=torch.float32, device=scores.device) + 0.5) * (vw / ow) / pw * 2 - 1
    ys = (torch.arange(r0, r1, dtype=torch.float32, device=scores.device) + 0.5) * (vh / oh) / ph * 2 - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1)[None]
    return F.grid_sample(scores[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


@torch.no_grad()
def predict(model: torch.nn.Module, image: torch.Tensor, out_size: tuple[int, int],
            size_divisor: int = 32) -> torch.Tensor:
    """image 3 x h x w (0..255; already at its test-time size) -> K x H x W class scores at
    ``out_size`` (:func:`resample_scores`)."""
    _, h, w = image.shape
    ph, pw = -h % size_divisor, -w % size_divisor
    x = F.pad(image[None].float(), (0, pw, 0, ph))
    out = model(x)
    scores = semantic_inference(out["pred_logits"], out["pred_masks"])
    return resample_scores(scores[0], (h, w), tuple(x.shape[-2:]), tuple(out_size))


def evaluate(model: torch.nn.Module, dataset_dir: str | Path, entries: list[dict], num_classes: int,
             device: torch.device, short_edge: int = 0, max_edge: int = 0, max_images: int = 0,
             progress: bool = True, on_prediction=None) -> np.ndarray:
    """Returns the K x K confusion matrix (rows ground truth) over ``entries``.

    ``on_prediction(name, pred, gt)`` is called with each prediction (for qualitative figures).
    """
    if max_images:
        entries = entries[:max_images]
    if not entries:
        raise ValueError(f"no test images to evaluate in '{dataset_dir}'")
    data = TestImages(dataset_dir, entries, short_edge, max_edge)
    loader = DataLoader(data, batch_size=None, num_workers=0, worker_init_fn=worker_init)
    conf = ConfusionMatrix(num_classes)
    for item in tqdm(loader, total=len(data), desc="evaluate", unit="img", disable=not progress, dynamic_ncols=True):
        gt = item["sem_seg"]
        scores = predict(model, item["image"].to(device), tuple(gt.shape))
        pred = scores.argmax(0).cpu()
        conf.update(pred, gt)
        if on_prediction is not None:
            on_prediction(item["name"], pred.numpy(), gt.numpy())
    return conf.matrix


def evaluate_model(model: torch.nn.Module, dataset_dir: str | Path, index: dict, split: dict, p: Params,
                   device: torch.device, progress: bool = True) -> tuple[dict, list[dict], np.ndarray]:
    """Evaluate on the test split with ``p``'s test-time settings.

    Returns (summary metrics with dataset and split, per-class rows, confusion matrix).
    """
    from .metrics import compute_metrics
    conf = evaluate(model, dataset_dir, index["test"], split["num_classes"], device, p.data.test_short_edge,
                    p.data.test_max_edge, p.eval.max_images, progress=progress)
    metrics = compute_metrics(conf, split["base"], split["novel"], split["class_names"])
    per_class = metrics.pop("per_class")
    return {"dataset": split["dataset"], "split": split["split"], **metrics}, per_class, conf
