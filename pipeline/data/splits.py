"""Weak-shot split generation and the per-image index of a prepared dataset folder.

:func:`build_split` scans every label PNG of ``annotations_detectron2/{train,test}`` once and
returns the ``split.json`` and ``index.json`` contents described in docs/ARCHITECTURE.md:
which base and novel classes each image contains, whether a train image is usable (its label
is not all 255 and it is not in the official exclusion list) and, for usable train images,
the images that contain each class (``class_to_images``, every class of the group listed,
possibly with an empty list). :func:`write_split` writes both files atomically.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.data import IGNORE, catalog
from pipeline.io import atomic_dir, write_json
from pipeline.jobs import run_parallel

IMAGE_DIR = "images_detectron2"
LABEL_DIR = "annotations_detectron2"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
REASON_ALL_IGNORE = "label is all 255 (ignore)"
REASON_EXCLUDED = "listed in splits.json excluded_train_images"


# ----------------------------------------------------------------------------- image header
def _png_size(head: bytes) -> tuple[int, int] | None:
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return int(h), int(w)
    return None


def _jpeg_size(f) -> tuple[int, int] | None:
    f.seek(0)
    if f.read(2) != b"\xff\xd8":
        return None
    while True:
        b = f.read(1)
        while b and b != b"\xff":
            b = f.read(1)
        while b == b"\xff":
            b = f.read(1)
        if not b:
            return None
        marker = b[0]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9:
            return None
        raw = f.read(2)
        if len(raw) < 2:
            return None
        seg_len = struct.unpack(">H", raw)[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            data = f.read(5)
            if len(data) < 5:
                return None
            h, w = struct.unpack(">HH", data[1:5])
            return int(h), int(w)
        f.seek(seg_len - 2, os.SEEK_CUR)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of a JPEG/PNG read from its header; falls back to decoding."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            size = _png_size(head) or _jpeg_size(f)
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    if size is not None and size[0] > 0 and size[1] > 0:
        return size
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"cannot read image {path}: not a readable image file")
    return int(img.shape[0]), int(img.shape[1])


# ----------------------------------------------------------------------------- label scan
def scan_label(label_path: str | os.PathLike, image_path: str | os.PathLike, num_classes: int) -> list[int]:
    """Class ids (and 255 if any) present in one label map, after checking it."""
    label_path = Path(label_path)
    lab = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    if lab is None:
        raise ValueError(f"cannot read label file {label_path}: missing, empty or not an image")
    if lab.ndim != 2:
        raise ValueError(f"label file {label_path} is not single-channel (shape {tuple(lab.shape)}); "
                         "expected an H x W uint8 map of class ids")
    if lab.dtype != np.uint8:
        raise ValueError(f"label file {label_path} has dtype {lab.dtype}; expected uint8 class ids")
    ih, iw = image_size(image_path)
    if lab.shape != (ih, iw):
        # the header may disagree with what readers see (EXIF orientation): decode to be sure
        img = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        if img is not None:
            ih, iw = int(img.shape[0]), int(img.shape[1])
    if lab.shape != (ih, iw):
        raise ValueError(f"label file {label_path} is {lab.shape[0]}x{lab.shape[1]} (HxW) but its image "
                         f"{image_path} is {ih}x{iw}")
    present = np.flatnonzero(np.bincount(lab.ravel(), minlength=256))
    bad = [int(v) for v in present if v >= num_classes and v != IGNORE]
    if bad:
        raise ValueError(f"label file {label_path} holds ids {bad[:10]} outside 0..{num_classes - 1} "
                         f"and {IGNORE} (ignore)")
    return [int(v) for v in present]


def _scan_job(args: tuple[str, str, int]) -> list[int]:
    return scan_label(*args)


def _list_images(dataset_dir: Path, split: str) -> list[Path]:
    folder = dataset_dir / IMAGE_DIR / split
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} is missing: is {dataset_dir} a prepared dataset folder?")
    images = sorted(p for p in folder.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}): "
                         f"the {split} split is empty")
    return images


# ----------------------------------------------------------------------------- split + index
def build_split(dataset_dir: str | os.PathLike, dataset: str, split_id: int, workers: int = 1,
                progress: bool = True) -> tuple[dict, dict]:
    """Scan the prepared dataset folder; return ``(split, index)`` (split.json, index.json)."""
    dataset_dir = Path(dataset_dir)
    classes = catalog.load_class_table(dataset_dir)
    declared = _declared_dataset(dataset_dir)
    if declared is not None and declared != dataset:
        raise ValueError(f"dataset folder {dataset_dir} holds dataset '{declared}' "
                         f"(classes.json) but the split was asked for dataset '{dataset}'")
    num_classes = len(classes)
    novel = catalog.novel_class_ids(dataset, split_id)
    if novel and max(novel) >= num_classes:
        raise ValueError(f"split {split_id} of '{dataset}' names class {max(novel)} but "
                         f"{dataset_dir / 'classes.json'} has only {num_classes} classes")
    novel_set = set(novel)
    base = [c for c in range(num_classes) if c not in novel_set]
    excluded = catalog.excluded_train_images(dataset)

    entries: dict[str, list[dict]] = {}
    jobs: list[tuple[str, int, tuple[str, str, int]]] = []
    for split in ("train", "test"):
        entries[split] = []
        for img in _list_images(dataset_dir, split):
            lab = dataset_dir / LABEL_DIR / split / f"{img.stem}.png"
            if not lab.is_file():
                raise FileNotFoundError(f"label file {lab} is missing for image {img}")
            entries[split].append({"image": img.relative_to(dataset_dir).as_posix(),
                                   "label": lab.relative_to(dataset_dir).as_posix()})
            jobs.append((split, len(entries[split]) - 1, (str(lab), str(img), num_classes)))

    args = [j[2] for j in jobs]
    with tqdm(total=len(args), desc="scan labels", unit="img", disable=not progress) as bar:
        results = run_parallel(_scan_job, args, workers, lambda job, result: bar.update(),
                               chunksize=max(1, min(64, len(args) // (4 * max(1, workers)))))

    for (split, i, _), present in zip(jobs, results):
        e = entries[split][i]
        ids = [c for c in present if c != IGNORE]
        e["base"] = [c for c in ids if c not in novel_set]
        e["novel"] = [c for c in ids if c in novel_set]
        reason = ""
        if not ids:
            reason = REASON_ALL_IGNORE
        elif split == "train" and Path(e["image"]).stem in excluded:
            reason = REASON_EXCLUDED
        e["usable"] = reason == ""
        e["reason"] = reason

    train = entries["train"]
    if not any(e["usable"] for e in train):
        raise ValueError(f"no usable train image in {dataset_dir / LABEL_DIR / 'train'}: every label is "
                         "all 255 or excluded")
    c2i: dict[str, dict[str, list[int]]] = {"base": {str(c): [] for c in base},
                                            "novel": {str(c): [] for c in novel}}
    for i, e in enumerate(train):
        if not e["usable"]:
            continue
        for group in ("base", "novel"):
            for c in e[group]:
                c2i[group][str(c)].append(i)

    split_doc = {"dataset": dataset, "split": int(split_id), "num_classes": num_classes,
                 "base": base, "novel": list(novel), "class_names": [c["name"] for c in classes]}
    index = {"train": train, "test": entries["test"], "class_to_images": c2i}
    return split_doc, index


def _declared_dataset(dataset_dir: Path) -> str | None:
    with open(dataset_dir / "classes.json", encoding="utf-8") as f:
        d = json.load(f).get("dataset")
    return d if isinstance(d, str) else None


def write_split(out_dir: str | os.PathLike, split: dict, index: dict) -> None:
    """Write ``split.json`` and ``index.json`` into ``out_dir``, replacing it atomically."""
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "split.json", split)
        write_json(tmp / "index.json", index)
