"""The embedded synthetic dataset: classes, splits, determinism, layout, class coverage, and a
generator crash that keeps the previous dataset."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from pipeline.config import SyntheticConfig
from pipeline.data import synthetic as S
from tests.helpers import files_under, leftovers, sha


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory):
    """120 train / 20 test images of 64 x 64, seed 6."""
    out = tmp_path_factory.mktemp("syn") / "dataset"
    summary = S.generate_dataset(out, SyntheticConfig(num_train=120, num_test=20, image_size=64, jitter=1.0, cooccur=0.0), seed=6,
                                 progress=False)
    return out, summary


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_class_table():
    assert len(S.CLASSES) == 24 >= 20
    assert [c["id"] for c in S.CLASSES] == list(range(24))
    assert sum(1 - c["isthing"] for c in S.CLASSES) == 10
    assert sum(c["isthing"] for c in S.CLASSES) == 14
    assert len({c["name"] for c in S.CLASSES}) == 24
    for c in S.CLASSES:
        assert set(c) == {"id", "name", "isthing", "color"}
        assert len(c["color"]) == 3 and all(0 <= v <= 255 for v in c["color"])


def test_splits_are_quarters_mixing_stuff_and_things():
    assert sorted(S.SPLITS) == [1, 2, 3, 4]
    seen = []
    for sid, novel in S.SPLITS.items():
        assert novel == sorted(novel) and len(set(novel)) == 6
        assert len(novel) / len(S.CLASSES) == 0.25
        kinds = {S.CLASSES[c]["isthing"] for c in novel}
        assert kinds == {0, 1}, f"split {sid} does not mix stuff and things"
        seen += novel
    assert len({tuple(v) for v in S.SPLITS.values()}) == 4
    assert sorted(seen) == list(range(24))  # each class novel exactly once


def test_generate_sample_shapes_and_values():
    rgb, lab = S.generate_sample(np.random.default_rng(0), 96)
    assert rgb.shape == (96, 96, 3) and rgb.dtype == np.uint8
    assert lab.shape == (96, 96) and lab.dtype == np.uint8
    present = [int(c) for c in np.unique(lab) if c != 255]        # 255: unlabelled clutter
    assert max(present) < 24
    assert len(present) >= 3  # 2-3 stuff + 2-7 things, at least one visible thing
    assert any(S.CLASSES[c]["isthing"] for c in present)
    assert sum(1 for c in present if not S.CLASSES[c]["isthing"]) >= 1
    # per-image RNG: the same generator state gives the same sample
    rgb2, lab2 = S.generate_sample(np.random.default_rng(0), 96)
    assert np.array_equal(rgb, rgb2) and np.array_equal(lab, lab2)


def test_sample_does_not_depend_on_dataset_size():
    a = S.generate_sample(S.sample_rng(6, "train", 5), 64)
    b = S.generate_sample(S.sample_rng(6, "train", 5), 64)
    c = S.generate_sample(S.sample_rng(6, "test", 5), 64)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_layout_counts_and_sizes(small_ds):
    out, summary = small_ds
    files = _files(out)
    jpgs = [f for f in files if f.endswith(".jpg")]
    pngs = [f for f in files if f.endswith(".png")]
    assert len(jpgs) == 140 and len(pngs) == 140 and len(files) == 281
    assert "images_detectron2/train/syn_train_000000.jpg" in files
    assert "annotations_detectron2/train/syn_train_000119.png" in files
    assert "images_detectron2/test/syn_test_000019.jpg" in files
    assert "images_detectron2/train/syn_train_000120.jpg" not in files
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    meta = json.loads((out / "classes.json").read_text())
    assert meta == {"dataset": "synthetic", "classes": S.CLASSES}
    assert summary["num_images"] == {"train": 120, "test": 20}
    assert summary["num_classes"] == 24
    assert abs(sum(summary["class_pixel_frequency"]["train"]) - 1.0) < 1e-4
    for split in ("train", "test"):
        for stem in (f"syn_{split}_000000", f"syn_{split}_000007"):
            img = cv2.imread(str(out / "images_detectron2" / split / f"{stem}.jpg"), cv2.IMREAD_UNCHANGED)
            lab = cv2.imread(str(out / "annotations_detectron2" / split / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
            assert img.shape == (64, 64, 3) and lab.shape == (64, 64) and lab.dtype == np.uint8
            assert lab[lab != 255].max() < 24


def test_files_match_generator_in_rgb_order(small_ds):
    out, _ = small_ds
    rgb, lab = S.generate_sample(S.sample_rng(6, "train", 3), 64)
    bgr = cv2.imread(str(out / "images_detectron2/train/syn_train_000003.jpg"))
    lab_file = cv2.imread(str(out / "annotations_detectron2/train/syn_train_000003.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(lab_file, lab)
    back = bgr[:, :, ::-1].astype(np.float64)
    err = np.abs(back - rgb).mean()
    swapped = np.abs(bgr.astype(np.float64) - rgb).mean()
    assert err < 9.0, err  # JPEG q95 round trip (4:2:0 chroma, fine textures, 64 px)
    assert swapped > 2 * err + 5.0, (swapped, err)  # channel order would be wrong otherwise
    assert np.abs(back.mean((0, 1)) - rgb.mean((0, 1))).max() < 2.0


def test_label_value_range_and_summary_frequency(small_ds):
    out, summary = small_ds
    counts = np.zeros(24, np.int64)
    for p in sorted((out / "annotations_detectron2/train").glob("*.png")):
        lab = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(lab).tolist()) <= set(range(24)) | {255}   # 255 = unlabelled clutter
        counts += np.bincount(lab.ravel(), minlength=24)[:24] > 0
    assert np.allclose(counts / 120, summary["class_image_frequency"]["train"], atol=1e-6)


def test_every_class_of_every_split_in_10_percent_of_train_images(small_ds):
    _, summary = small_ds
    freq = np.asarray(summary["class_image_frequency"]["train"])
    for sid, novel in S.SPLITS.items():
        assert (freq[novel] >= 0.10).all(), (sid, freq[novel])
    assert freq.min() >= 0.10, freq
    assert freq.max() <= 0.45, freq  # balanced: no class dominates the images


def test_determinism_same_seed_bytes_different_seed_differs(small_ds, tmp_path):
    out, _ = small_ds
    cfg = SyntheticConfig(num_train=6, num_test=2, image_size=64, jitter=1.0, cooccur=0.0)
    a = tmp_path / "a"
    b = tmp_path / "b"
    S.generate_dataset(a, cfg, seed=6, progress=False)
    S.generate_dataset(b, cfg, seed=7, progress=False)
    files = _files(a)
    assert len(files) == 17
    for f in files:
        # same seed, different num_train: the shared images are byte-identical
        assert (a / f).read_bytes() == (out / f).read_bytes(), f
    differs = [f for f in files if f.endswith(".jpg") and (a / f).read_bytes() != (b / f).read_bytes()]
    assert len(differs) == 8
    # regenerating into the same folder replaces it atomically with identical content
    S.generate_dataset(a, cfg, seed=6, progress=False)
    assert all((a / f).read_bytes() == (out / f).read_bytes() for f in files)


def test_colour_alone_is_not_enough(small_ds):
    """The nearest-mean-colour baseline (fitted on train with all classes) is far from perfect."""
    from pipeline.data.splits import build_split
    from pipeline.engine.baselines import trivial_baselines
    out, summary = small_ds
    split, index = build_split(out, "synthetic", 1, progress=False)
    b = trivial_baselines(out, index, split)
    assert 20.0 < b["nearest_colour"]["pAcc"] < 70.0, b["nearest_colour"]
    assert b["majority"]["pAcc"] < b["nearest_colour"]["pAcc"]
    assert 0.10 <= summary["unlabelled_fraction"]["train"] <= 0.30, summary["unlabelled_fraction"]


def test_generator_crash_keeps_previous_dataset(tmp_path, monkeypatch):
    """A real writer (the synthetic generator) failing on its 7th image: the dataset built by
    an earlier run is untouched, and no temporary folder is left."""
    from pipeline.config import SyntheticConfig
    from pipeline.data import synthetic
    out = tmp_path / "dataset"
    cfg = SyntheticConfig(num_train=4, num_test=2, image_size=32, jitter=1.0, cooccur=0.0)
    synthetic.generate_dataset(out, cfg, 1, progress=False)
    before = {f: sha(out / f) for f in files_under(out) if (out / f).is_file()}
    real = cv2.imwrite
    calls = {"n": 0}

    def imwrite(path, *a, **k):
        calls["n"] += 1
        return False if calls["n"] == 7 else real(path, *a, **k)

    monkeypatch.setattr(synthetic.cv2, "imwrite", imwrite)
    with pytest.raises(OSError, match=r"could not write .*\.(jpg|png)"):
        synthetic.generate_dataset(out, cfg, 2, progress=False)
    assert {f: sha(out / f) for f in files_under(out) if (out / f).is_file()} == before
    assert leftovers(tmp_path, {"dataset"}) == []
