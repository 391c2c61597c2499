import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.sampler import PairBatchSampler, RandomBatchSampler  # noqa: E402

# images 0..5: 0,1 share novel 10; 2 is the only image of novel 11; 3,4 have no novel class;
# 5 is alone in base class 1 and has no novel class.
INDEX = {"base": {"0": [0, 1, 2, 3, 4], "1": [5]}, "novel": {"10": [0, 1], "11": [2]}}


def test_partner_fallbacks_on_hand_made_index():
    s = PairBatchSampler(INDEX, range(6), 2, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert s.partner(0, rng) == 1 and s.partner(1, rng) == 0       # shared novel class
        assert s.partner(2, rng) in {0, 1, 3, 4}                        # novel 11 alone -> base 0
        assert s.partner(3, rng) in {0, 1, 2, 4}                        # no novel -> base 0
        assert s.partner(5, rng) == 5                                   # nothing shared -> itself
    only5 = PairBatchSampler(INDEX, [5], 6, seed=0)
    assert only5.batch(0) == [5] * 6


def test_partner_respects_usable():
    s = PairBatchSampler(INDEX, [0, 2, 3], 2, seed=0)       # image 1 not usable
    rng = np.random.default_rng(1)
    seen = {s.partner(0, rng) for _ in range(30)}
    assert seen <= {2, 3} and seen                          # falls back to base class 0
    for step in range(20):
        assert set(s.batch(step)) <= {0, 2, 3}


def _random_index(n=40, seed=0):
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        images.append({"base": sorted(rng.choice(10, size=rng.integers(0, 3), replace=False).tolist()),
                       "novel": sorted((10 + rng.choice(6, size=rng.integers(0, 3), replace=False)).tolist()),
                       "usable": True})
    c2i = {"base": {}, "novel": {}}
    for i, e in enumerate(images):
        for kind in ("base", "novel"):
            for c in e[kind]:
                c2i[kind].setdefault(str(c), []).append(i)
    return images, c2i


def test_pairs_share_a_novel_class_when_possible():
    images, c2i = _random_index()
    s = PairBatchSampler(c2i, range(len(images)), 8, seed=6)
    novel = [set(e["novel"]) for e in images]
    for step in range(50):
        b = s.batch(step)
        assert len(b) == 8
        for a, p in zip(b[0::2], b[1::2]):
            possible = any(novel[a] & novel[j] for j in range(len(images)) if j != a)
            if possible:
                assert p != a and novel[a] & novel[p]


def test_image_list_format_equals_mapping():
    images, c2i = _random_index()
    s1 = PairBatchSampler(c2i, range(len(images)), 6, seed=2)
    s2 = PairBatchSampler(images, range(len(images)), 6, seed=2)
    assert [s1.batch(k) for k in range(10)] == [s2.batch(k) for k in range(10)]


def test_determinism_and_resume():
    images, c2i = _random_index()
    s1 = PairBatchSampler(c2i, range(40), 4, seed=3)
    s2 = PairBatchSampler(c2i, range(40), 4, seed=3, start_step=7, num_steps=3)
    assert [s1.batch(k) for k in range(12)] == [PairBatchSampler(c2i, range(40), 4, seed=3).batch(k)
                                                for k in range(12)]
    assert list(s2) == [s1.batch(7), s1.batch(8), s1.batch(9)]
    assert len(s2) == 3
    s3 = PairBatchSampler(c2i, range(40), 4, seed=4)
    assert [s1.batch(k) for k in range(5)] != [s3.batch(k) for k in range(5)]
    it = iter(s1)
    assert [next(it) for _ in range(3)] == [s1.batch(0), s1.batch(1), s1.batch(2)]
    with pytest.raises(TypeError):
        len(s1)


@pytest.mark.parametrize("bs", [2, 4, 6, 10, 100])
def test_any_even_batch_size(bs):
    images, c2i = _random_index()
    b = PairBatchSampler(c2i, range(40), bs, seed=0).batch(0)
    assert len(b) == bs and all(0 <= i < 40 for i in b)


def test_validation_errors():
    with pytest.raises(ValueError, match=r"train\.batch_size.*even"):
        PairBatchSampler(INDEX, range(6), 5, seed=0)
    with pytest.raises(ValueError, match="usable"):
        PairBatchSampler(INDEX, [], 4, seed=0)
    with pytest.raises(ValueError, match="usable"):
        RandomBatchSampler([], 4, seed=0)


def test_random_batch_sampler():
    s = RandomBatchSampler(range(10, 30), 5, seed=1, num_steps=4)
    batches = list(s)
    assert len(batches) == 4 == len(s)
    for b in batches:
        assert len(b) == 5 and len(set(b)) == 5 and set(b) <= set(range(10, 30))
    r = RandomBatchSampler(range(10, 30), 5, seed=1, start_step=2, num_steps=2)
    assert list(r) == batches[2:]
    small = RandomBatchSampler([7, 8], 5, seed=0)
    assert len(small.batch(0)) == 5 and set(small.batch(0)) <= {7, 8}
