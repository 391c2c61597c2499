"""Batch samplers for the training DataLoader (``DataLoader(ds, batch_sampler=...)``).

Both samplers are stateless per step: the batch of step ``s`` depends only on
``(seed, s)`` (an ``np.random.default_rng([seed, s])``), so a run resumed at step ``s``
sees exactly the batches an uninterrupted run would have seen.

* :class:`PairBatchSampler` - SimFormer's pair batches: ``[a1, b1, a2, b2, ...]`` where each
  partner ``b`` shares a novel class with its anchor ``a`` whenever possible.
* :class:`RandomBatchSampler` - plain random batches (``train.pair_sampling: false``).

``num_steps`` is the number of batches the iterator yields (``len(sampler)``), starting at
step ``start_step``: batches ``start_step .. start_step + num_steps - 1``; ``None`` = forever.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np


def _check_common(usable: Sequence[int], batch_size: int, start_step: int, num_steps: int | None) -> list[int]:
    usable = sorted({int(i) for i in usable})
    if not usable:
        raise ValueError("no usable training images: the sampler has nothing to draw from "
                         "(check index.json: every train image is marked unusable or the list is empty)")
    if int(batch_size) < 1:
        raise ValueError(f"train.batch_size must be >= 1, got {batch_size}")
    if int(start_step) < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if num_steps is not None and int(num_steps) < 0:
        raise ValueError(f"num_steps must be >= 0 or None, got {num_steps}")
    return usable


class _StepSampler:
    seed: int
    start_step: int
    num_steps: int | None

    def batch(self, step: int) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([int(self.seed), int(step)])

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        end = None if self.num_steps is None else self.start_step + self.num_steps
        while end is None or step < end:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError(f"{type(self).__name__} without num_steps is infinite and has no length")
        return self.num_steps


class RandomBatchSampler(_StepSampler):
    """``batch_size`` usable images per step, without replacement within a batch when there
    are enough usable images (with replacement otherwise)."""

    def __init__(self, usable: Sequence[int], batch_size: int, seed: int, start_step: int = 0,
                 num_steps: int | None = None):
        self.usable = _check_common(usable, batch_size, start_step, num_steps)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.start_step = int(start_step)
        self.num_steps = None if num_steps is None else int(num_steps)

    def batch(self, step: int) -> list[int]:
        rng = self._rng(step)
        pick = rng.choice(len(self.usable), size=self.batch_size, replace=len(self.usable) < self.batch_size)
        return [self.usable[int(i)] for i in pick]


def _invert(class_to_images: Any) -> tuple[dict[str, dict[int, list[int]]], dict[str, dict[int, list[int]]]]:
    """Normalise the index to ``({"base"|"novel": {cid: [imgs]}}, {"base"|"novel": {img: [cids]}})``.

    Accepts index.json's ``class_to_images`` (``{"base": {"<cid>": [idx]}, "novel": {...}}``,
    string or int keys) or index.json's ``train`` image list (per-image ``"base"`` /
    ``"novel"`` class lists; the list position is the image index; entries with
    ``"usable": false`` are skipped).
    """
    c2i: dict[str, dict[int, set[int]]] = {"base": {}, "novel": {}}
    if isinstance(class_to_images, Mapping):
        for kind in ("base", "novel"):
            for cid, imgs in (class_to_images.get(kind) or {}).items():
                c2i[kind].setdefault(int(cid), set()).update(int(i) for i in imgs)
    elif isinstance(class_to_images, Sequence):
        for idx, entry in enumerate(class_to_images):
            if not entry.get("usable", True):
                continue
            for kind in ("base", "novel"):
                for cid in entry.get(kind, []) or []:
                    c2i[kind].setdefault(int(cid), set()).add(idx)
    else:
        raise TypeError("class_to_images must be index.json's class_to_images mapping or its train image list, "
                        f"got {type(class_to_images).__name__}")
    i2c: dict[str, dict[int, list[int]]] = {"base": {}, "novel": {}}
    out: dict[str, dict[int, list[int]]] = {"base": {}, "novel": {}}
    for kind in ("base", "novel"):
        for cid in sorted(c2i[kind]):
            imgs = sorted(c2i[kind][cid])
            out[kind][cid] = imgs
            for i in imgs:
                i2c[kind].setdefault(i, []).append(cid)
    return out, i2c


class PairBatchSampler(_StepSampler):
    """Pairs of images that share a novel class: ``batch(step) -> [a1, b1, a2, b2, ...]``.

    Per pair: an anchor drawn uniformly from the usable images (anchors without replacement
    within a batch when there are enough usable images); the partner is a random other
    usable image of a random novel class of the anchor that has such an image; failing
    that, the same with the anchor's base classes; failing that, the anchor itself.
    Only usable images are ever returned (``class_to_images`` is intersected with ``usable``).
    """

    def __init__(self, class_to_images: Any, usable: Sequence[int], batch_size: int, seed: int,
                 start_step: int = 0, num_steps: int | None = None):
        self.usable = _check_common(usable, batch_size, start_step, num_steps)
        if int(batch_size) % 2:
            raise ValueError(f"train.batch_size must be even when batches are image pairs "
                             f"(train.pair_sampling: true), got {batch_size}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.start_step = int(start_step)
        self.num_steps = None if num_steps is None else int(num_steps)
        ok = set(self.usable)
        c2i, i2c = _invert(class_to_images)
        self._c2i = {k: {c: [i for i in imgs if i in ok] for c, imgs in v.items()} for k, v in c2i.items()}
        self._i2c = i2c

    def partner(self, anchor: int, rng: np.random.Generator) -> int:
        """A partner for ``anchor``: shared novel class, else shared base class, else itself."""
        for kind in ("novel", "base"):
            classes = [c for c in self._i2c[kind].get(anchor, [])
                       if any(i != anchor for i in self._c2i[kind].get(c, []))]
            if classes:
                c = classes[int(rng.integers(len(classes)))]
                others = [i for i in self._c2i[kind][c] if i != anchor]
                return others[int(rng.integers(len(others)))]
        return anchor

    def batch(self, step: int) -> list[int]:
        rng = self._rng(step)
        n_pairs = self.batch_size // 2
        anchors = rng.choice(len(self.usable), size=n_pairs, replace=len(self.usable) < n_pairs)
        out: list[int] = []
        for j in anchors:
            a = self.usable[int(j)]
            out += [a, self.partner(a, rng)]
        return out
