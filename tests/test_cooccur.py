"""data.synthetic.cooccur: scene images where novel classes co-occur (pipeline/data/synthetic.py)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pipeline.config import ConfigError, build_params
from pipeline.data import IGNORE
from pipeline.data import synthetic as S
from tests.conftest import file_params

# sha256 of the images and labels generate_sample drew before data.synthetic.cooccur existed
# (train 0-5 and test 0-2 at seed 6, 128 px, jitter 0.5: the default dataset's first images)
DEFAULT_HASH = "77676e17444df060a0ee1576a45800429822aee702e00f9bac2ae51780ac0da3"


def _labels(cooccur: float, n: int = 60, size: int = 64, seed: int = 6) -> list[np.ndarray]:
    return [S.generate_sample(S.sample_rng(seed, "train", i), size, 0.5, cooccur)[1] for i in range(n)]


def test_cooccur_zero_generates_todays_bits():
    p = build_params(file_params())
    assert p.data.synthetic.cooccur == 0.0          # the default data is today's
    h = hashlib.sha256()
    for split, n in (("train", 6), ("test", 3)):
        for i in range(n):
            rgb, lab = S.generate_sample(S.sample_rng(6, split, i), 128, 0.5, p.data.synthetic.cooccur)
            h.update(rgb.tobytes())
            h.update(lab.tobytes())
    assert h.hexdigest() == DEFAULT_HASH


def test_scene_groups_hold_two_novel_classes_of_every_split():
    members = [set(g["stuff"] + g["things"]) for g in S.SCENES]
    assert sorted(c for m in members for c in m) == list(range(S.NUM_CLASSES))     # a partition of the classes
    for split, novel in S.SPLITS.items():
        for m in members:
            assert len(m & set(novel)) == 2, (split, m)
        assert len(S.scene_novel_pairs(split)) == len(S.SCENES)


def test_novel_pair_cooccurrence_grows_with_the_setting():
    pairs = [p for s in S.SPLITS for p in S.scene_novel_pairs(s)]
    measured = [S.pair_cooccurrence(_labels(c), pairs) for c in (0.0, 0.5, 1.0)]
    assert measured[0] < 0.3                         # independent classes: image labels separate them
    assert measured[0] < measured[1] < measured[2]
    assert measured[2] > 0.9                         # every image a scene image: the pairs share their images


def test_scene_images_always_hold_clutter():
    labs = _labels(1.0, n=20)
    assert all((lab == IGNORE).any() for lab in labs)
    assert np.mean([(lab == IGNORE).mean() for lab in labs]) > np.mean([(lab == IGNORE).mean() for lab in _labels(0.0, n=20)])


def test_cooccur_is_deterministic_for_a_seed():
    a = S.generate_sample(S.sample_rng(3, "test", 5), 64, 0.5, 0.7)
    b = S.generate_sample(S.sample_rng(3, "test", 5), 64, 0.5, 0.7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(_labels(0.7, n=5, seed=3)[0], _labels(0.7, n=5, seed=4)[0])


def test_cooccur_out_of_range_names_the_key():
    with pytest.raises(ConfigError, match=r"data\.synthetic\.cooccur"):
        build_params(file_params({"data": {"synthetic": {"cooccur": 1.5}}}))


def test_describe_setting_says_what_it_models():
    assert "independently" in S.describe_setting(0.0)
    assert "co-occurs" in S.describe_setting(0.5) and "50%" in S.describe_setting(0.5)
