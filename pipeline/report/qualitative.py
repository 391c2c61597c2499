"""Qualitative figure like the paper's: image, ground truth, prediction and the top proposals.

One row per image: the RGB image, the coloured ground truth, the coloured semantic
prediction (argmax of :func:`pipeline.model.semantic_inference`, upsampled to the image) and,
for the ``top_k`` queries ranked by their highest non-no-object class probability, the
query's binary mask (``sigmoid > 0.5`` after bilinear upsampling to the image size) titled
with its class (``*`` marks a novel class) and that probability.

Imports torch, so it is not re-exported from ``pipeline.report`` (which stays torch-free).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..model.maskformer import semantic_inference
from .figures import _new_figure, _save

from ..data import IGNORE as IGNORE_INDEX
IGNORE_COLOR = (0, 0, 0)


def default_palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """Deterministic K x 3 uint8 palette (fixed random colours, never pure black)."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 256, size=(int(num_classes), 3), dtype=np.int64).astype(np.uint8)


def colorize(label: np.ndarray, colors, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """H x W class ids -> H x W x 3 uint8; ``ignore_index`` (and any id without a colour) is black."""
    pal = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    lab = np.asarray(label).astype(np.int64)
    out = np.zeros(lab.shape + (3,), dtype=np.uint8)
    out[...] = IGNORE_COLOR
    ok = (lab >= 0) & (lab < len(pal)) & (lab != ignore_index)
    out[ok] = pal[lab[ok]]
    return out


@torch.no_grad()
def _infer(model: torch.nn.Module, image: np.ndarray, device, size_divisor: int = 32):
    """uint8 H x W x 3 -> (prediction H x W int64, class probs Q x K+1, mask logits Q x H x W)."""
    h, w = image.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None].to(device)
    ph, pw = -h % size_divisor, -w % size_divisor
    x = F.pad(x, (0, pw, 0, ph))
    out = model(x)
    logits, masks = out["pred_logits"], out["pred_masks"]
    scores = semantic_inference(logits, masks)
    scores = F.interpolate(scores, size=x.shape[-2:], mode="bilinear", align_corners=False)[..., :h, :w]
    pred = scores[0].argmax(0).cpu().numpy()
    masks_up = F.interpolate(masks.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[0, :, :h, :w]
    probs = logits[0].float().softmax(-1)
    return pred, probs.cpu(), masks_up.cpu()


def top_proposals(probs: torch.Tensor, k: int) -> list[tuple[int, int, float]]:
    """(query, class, score) of the ``k`` queries with the highest non-no-object class
    probability, best first (ties by query index)."""
    score, cls = probs[:, :-1].max(dim=-1)
    order = sorted(range(len(score)), key=lambda q: (-float(score[q]), q))[: max(0, int(k))]
    return [(q, int(cls[q]), float(score[q])) for q in order]


def _class_label(c: int, class_names: Sequence[str], novel: set[int]) -> str:
    name = str(class_names[c]) if 0 <= c < len(class_names) else str(c)
    return f"{name}*" if c in novel else name


def first_test_images(dataset_dir, index: dict, n: int = 3) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, image, ground truth)`` of the first ``n`` test images (the report's and the MLflow
    run's qualitative figure show the same ones)."""
    from ..data.dataset import read_image, read_label
    dataset_dir = Path(dataset_dir)
    out = []
    for e in index["test"][:n]:
        img = read_image(dataset_dir / e["image"])
        out.append((Path(e["image"]).stem, img, read_label(dataset_dir / e["label"], img.shape[:2])))
    return out


def render_qualitative(model: torch.nn.Module, dataset_dir, index: dict, split: dict, out_png,
                       device="cpu") -> Path:
    """The qualitative figure of the first three test images with the prepared dataset's class
    names and colours (``classes.json``)."""
    from ..data.catalog import load_class_table
    table = load_class_table(dataset_dir)
    return qualitative_figure(model, first_test_images(dataset_dir, index), [c["name"] for c in table],
                              [c["color"] for c in table], split["novel"], out_png, top_k=3, device=device)


def qualitative_figure(model: torch.nn.Module, images: list[tuple[str, np.ndarray, np.ndarray]],
                       class_names: Sequence[str], colors, novel_ids: Iterable[int], out_png,
                       top_k: int = 3, device="cpu") -> Path:
    """Write the qualitative PNG; returns its path.

    ``images``: ``(name, image uint8 H x W x 3 RGB, ground truth H x W ids, 255 = ignore)``.
    ``colors``: K x 3 uint8 palette (``None`` -> :func:`default_palette`). The model is run in
    eval mode on ``device`` and its train/eval mode is restored afterwards. Columns: image,
    ground truth, prediction, then ``top_k`` proposal masks, so the width grows with ``top_k``.
    """
    if not images:
        raise ValueError("qualitative_figure: no images given")
    top_k = max(0, int(top_k))
    num_classes = int(getattr(model, "num_classes", len(class_names)))
    if len(class_names) != num_classes:
        raise ValueError(f"qualitative_figure: {len(class_names)} class names for a model with {num_classes} classes")
    colors = default_palette(num_classes) if colors is None else np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    if len(colors) < num_classes:
        raise ValueError(f"qualitative_figure: {len(colors)} colours for {num_classes} classes")
    novel = {int(i) for i in novel_ids}
    device = torch.device(device)

    rows = []                       # (name, image, gt, prediction, class probs, mask logits)
    was_training = model.training
    model.eval()
    try:
        for name, image, gt in images:
            image, gt = np.asarray(image), np.asarray(gt)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"qualitative_figure: image '{name}' must be uint8 H x W x 3, "
                                 f"got {image.dtype} {image.shape}")
            if gt.shape != image.shape[:2]:
                raise ValueError(f"qualitative_figure: ground truth of '{name}' has shape {gt.shape}, "
                                 f"image {image.shape[:2]}")
            rows.append((name, image, gt, *_infer(model, image, device)))
    finally:
        model.train(was_training)
    # the colour legend: every class in a ground truth or a prediction, then "ignored"
    from matplotlib.patches import Patch
    shown = sorted({int(c) for r in rows for c in np.unique(np.concatenate([r[2].ravel(), r[3].ravel()]))
                    if 0 <= c < num_classes})
    handles = [Patch(facecolor=colors[c] / 255.0, edgecolor="0.3", label=_class_label(c, class_names, novel))
               for c in shown] + [Patch(facecolor=np.array(IGNORE_COLOR) / 255.0, edgecolor="0.3", label="ignored")]

    ncols, panel, font = 3 + top_k, 2.4, 11
    legend_cols = 6                 # rows of the legend do not depend on top_k
    legend_h = 0.5 + 0.3 * -(-len(handles) // legend_cols)
    fig = _new_figure(panel * ncols, (panel + 0.35) * len(rows) + legend_h)
    fig.set_layout_engine("constrained")
    axes = np.asarray(fig.subplots(len(rows), ncols, squeeze=False))
    for ax, (name, image, gt, pred, probs, masks) in zip(axes, rows):
        ax[0].imshow(image)
        ax[0].set_title(str(name), fontsize=font)
        ax[1].imshow(colorize(gt, colors), interpolation="nearest")
        ax[1].set_title("ground truth", fontsize=font)
        ax[2].imshow(colorize(pred, colors), interpolation="nearest")
        ax[2].set_title("prediction", fontsize=font)
        props = top_proposals(probs, top_k)
        for j in range(top_k):
            a = ax[3 + j]
            if j < len(props):
                q, c, s = props[j]
                a.imshow((masks[q].sigmoid() > 0.5).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                a.set_title(f"{_class_label(c, class_names, novel)} {s:.2f}", fontsize=font,
                            color="#C44E52" if c in novel else "black")
            else:
                a.text(0.5, 0.5, "no query", ha="center", va="center", transform=a.transAxes, fontsize=font)
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    fig.legend(handles=handles, loc="outside lower center", ncol=legend_cols, fontsize=font - 1, frameon=False,
               title="classes (* = novel)", title_fontsize=font - 1)
    return _save(fig, out_png)
