"""Datasets over the prepared layout: augmented training crops and full test images.

Training items are addressed by ``(index, step, slot)`` keys from the batch samplers, and
every random choice of an item's augmentation comes from an RNG seeded by
``(seed, step, slot, index)``: a resumed run sees exactly the crops it would have seen.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from . import IGNORE


def input_example(dataset_dir: str | Path, index: dict, size: int = 64) -> np.ndarray:
    """The first test image, cropped to ``size`` px: a logged model's input example."""
    return read_image(Path(dataset_dir) / index["test"][0]["image"])[:size, :size]


def read_image(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot read image '{path}': missing, unreadable or not an image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_label(path: Path, image_shape: tuple[int, int] | None = None) -> np.ndarray:
    lab = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise ValueError(f"cannot read label '{path}': missing, unreadable or not a PNG")
    if lab.ndim != 2:
        raise ValueError(f"label '{path}' has shape {lab.shape}; expected a single-channel uint8 map")
    if image_shape is not None and lab.shape != tuple(image_shape):
        raise ValueError(f"label '{path}' is {lab.shape[1]}x{lab.shape[0]} but its image is "
                         f"{image_shape[1]}x{image_shape[0]} (width x height)")
    return lab


def photometric_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast and saturation (each with probability 0.5), then hue shift."""
    x = img.astype(np.float32)
    if rng.random() < 0.5:
        x += rng.uniform(-32, 32)
    if rng.random() < 0.5:
        x *= rng.uniform(0.5, 1.5)
    if rng.random() < 0.5:
        gray = x.mean(axis=2, keepdims=True)
        x = gray + (x - gray) * rng.uniform(0.5, 1.5)
    x = np.clip(x, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(rng.integers(-9, 10))) % 180).astype(np.uint8)
        x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return x


def random_resized_crop(img: np.ndarray, lab: np.ndarray, crop: int, scale: tuple[float, float],
                        rng: np.random.Generator):
    """Short edge resized to U(scale) * crop, random crop x crop, padding (label 255) when smaller."""
    h, w = lab.shape
    f = rng.uniform(*scale) * crop / min(h, w)
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    lab = cv2.resize(lab, (nw, nh), interpolation=cv2.INTER_NEAREST)
    y0 = int(rng.integers(0, max(nh - crop, 0) + 1))
    x0 = int(rng.integers(0, max(nw - crop, 0) + 1))
    img, lab = img[y0:y0 + crop, x0:x0 + crop], lab[y0:y0 + crop, x0:x0 + crop]
    out_img = np.zeros((crop, crop, 3), np.uint8)
    out_lab = np.full((crop, crop), IGNORE, np.uint8)
    valid = np.zeros((crop, crop), bool)
    out_img[:img.shape[0], :img.shape[1]] = img
    out_lab[:lab.shape[0], :lab.shape[1]] = lab
    valid[:lab.shape[0], :lab.shape[1]] = True
    return out_img, out_lab, valid


class TrainCrops(Dataset):
    """Augmented training crops. ``entries`` are index.json ``train`` records."""

    def __init__(self, root: str | Path, entries: list[dict], crop_size: int, scale: tuple[float, float],
                 seed: int, label_root: str | Path | None = None, photometric: bool = True):
        self.root, self.entries = Path(root), entries
        self.photometric = photometric
        self.label_root = Path(label_root) if label_root is not None else self.root
        self.crop, self.scale, self.seed = crop_size, scale, seed

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key) -> dict:
        idx, step, slot = key if isinstance(key, tuple) else (key, 0, 0)
        rng = np.random.default_rng([self.seed, step, slot, idx])
        e = self.entries[idx]
        img = read_image(self.root / e["image"])
        lab = read_label(self.label_root / e["label"], img.shape[:2])
        img, lab, valid = random_resized_crop(img, lab, self.crop, self.scale, rng)
        if self.photometric:
            img = photometric_jitter(img, rng)
        if rng.random() < 0.5:
            img, lab, valid = img[:, ::-1], lab[:, ::-1], valid[:, ::-1]
        return {"image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
                "sem_seg": torch.from_numpy(np.ascontiguousarray(lab)).long(),
                "valid": torch.from_numpy(np.ascontiguousarray(valid)),
                "index": idx}


def test_size(h: int, w: int, short_edge: int, max_edge: int) -> tuple[int, int]:
    """The test-time size of an ``h x w`` image (``data.test_short_edge`` / ``data.test_max_edge``,
    0 = unchanged): the short edge scaled to ``short_edge``, then the long edge capped at
    ``max_edge``. Evaluation, pseudo-labelling and predict all resize with this."""
    f = 1.0
    if short_edge:
        f = short_edge / min(h, w)
    if max_edge and max(h, w) * f > max_edge:
        f = max_edge / max(h, w)
    if f == 1.0:
        return h, w
    return max(1, round(h * f)), max(1, round(w * f))


def resize_for_test(img: np.ndarray, short_edge: int, max_edge: int) -> np.ndarray:
    """``img`` (H x W x 3) at its :func:`test_size` (bilinear; unchanged when the size is)."""
    h, w = img.shape[:2]
    th, tw = test_size(h, w, short_edge, max_edge)
    if (th, tw) == (h, w):
        return img
    return cv2.resize(img, (tw, th), interpolation=cv2.INTER_LINEAR)


class TestImages(Dataset):
    """Whole test images, optionally resized (short edge, capped long edge); labels at full size."""

    def __init__(self, root: str | Path, entries: list[dict], short_edge: int = 0, max_edge: int = 0):
        self.root, self.entries = Path(root), entries
        self.short_edge, self.max_edge = short_edge, max_edge

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, idx: int) -> dict:
        e = self.entries[idx]
        img = read_image(self.root / e["image"])
        lab = read_label(self.root / e["label"], img.shape[:2])
        img = resize_for_test(img, self.short_edge, self.max_edge)
        return {"image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
                "sem_seg": torch.from_numpy(lab.astype(np.int64)), "index": idx, "name": Path(e["image"]).stem}


def worker_init(_: int) -> None:
    # OpenCV's own thread pool fights the DataLoader's worker processes.
    cv2.setNumThreads(0)


def collate_train(items: list[dict]) -> dict:
    return {"image": torch.stack([it["image"] for it in items]),
            "sem_seg": torch.stack([it["sem_seg"] for it in items]),
            "valid": torch.stack([it["valid"] for it in items]),
            "index": torch.tensor([it["index"] for it in items])}
