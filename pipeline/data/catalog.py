"""Class tables and official weak-shot splits of every supported dataset.

Real datasets read the tables shipped beside this file (``classes.json``, ``splits.json``,
see /work/shared/reference/SIMFORMER.md); the synthetic dataset uses the constants of
:mod:`pipeline.data.synthetic`. Every function returns fresh copies: callers may mutate them.
"""
from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

from pipeline.config import DATASETS
from pipeline.data import synthetic

DATA_DIR = Path(__file__).parent
REAL_DATASETS = ("ade20k", "coco_stuff_10k")


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; allowed datasets: {', '.join(DATASETS)}")


@functools.lru_cache(maxsize=None)
def _load_table(name: str) -> dict:
    path = DATA_DIR / name
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the dataset table {path}: {e}") from e


def class_table(dataset: str) -> list[dict]:
    """Class dicts ``{"id", "name", "isthing", "color", ...}`` in contiguous-id order."""
    _check_dataset(dataset)
    if dataset == "synthetic":
        return copy.deepcopy(synthetic.CLASSES)
    return copy.deepcopy(_load_table("classes.json")[dataset])


def load_class_table(dataset_dir: str | os.PathLike) -> list[dict]:
    """Read ``<dataset_dir>/classes.json`` (the prepared dataset's own class table)."""
    path = Path(dataset_dir) / "classes.json"
    if not path.is_file():
        raise FileNotFoundError(f"class table {path} is missing: is {Path(dataset_dir)} a prepared dataset "
                                "folder (run the download stage first)?")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"class table {path} is not valid JSON: {e}") from e
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, list) or not classes:
        raise ValueError(f"class table {path} is invalid: expected an object with a non-empty 'classes' list")
    for i, c in enumerate(classes):
        if not isinstance(c, dict) or not {"id", "name"} <= set(c):
            raise ValueError(f"class table {path} is invalid: entry {i} lacks 'id' or 'name'")
        if c["id"] != i:
            raise ValueError(f"class table {path} is invalid: entry {i} has id {c['id']!r}, "
                             f"expected contiguous ids (id {i})")
    return classes


def split_ids(dataset: str) -> tuple[int, ...]:
    """The official split ids of ``dataset``."""
    _check_dataset(dataset)
    if dataset == "synthetic":
        return tuple(sorted(synthetic.SPLITS))
    return tuple(sorted(int(k) for k in _load_table("splits.json")[dataset]))


def novel_class_ids(dataset: str, split: int) -> list[int]:
    """Sorted novel class ids of official split ``split``; every other class is base."""
    allowed = split_ids(dataset)
    if isinstance(split, bool) or not isinstance(split, int) or split not in allowed:
        raise ValueError(f"split {split!r} is out of range for dataset '{dataset}'; allowed split ids: "
                         + ", ".join(map(str, allowed)))
    if dataset == "synthetic":
        return sorted(synthetic.SPLITS[split])
    return sorted(int(c) for c in _load_table("splits.json")[dataset][str(split)])


def excluded_train_images(dataset: str) -> set[str]:
    """Stems of train images the official recipe skips (COCO-Stuff-10K's 7; none otherwise).

    ADE20K's 16 all-ignore images are found by scanning labels, not listed here.
    """
    _check_dataset(dataset)
    if dataset == "coco_stuff_10k":
        return set(_load_table("splits.json")["excluded_train_images"]["coco_stuff_10k"])
    return set()
