"""Class catalogue lookups and build_split / write_split on hand-made datasets."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from pipeline.data import catalog, synthetic
from pipeline.data.splits import REASON_ALL_IGNORE, REASON_EXCLUDED, build_split, image_size, write_split

NOVEL1 = [1, 7, 12, 16, 20, 23]  # synthetic split 1


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)


def _label(values_by_row, h=8, w=10):
    """A label whose rows are filled with the given ids in turn."""
    lab = np.empty((h, w), np.uint8)
    for r in range(h):
        lab[r] = values_by_row[r % len(values_by_row)]
    return lab


def make_dataset(root, train_labels: dict, test_labels: dict, dataset="synthetic", classes=None,
                 image_ext=".jpg", image_shapes: dict | None = None):
    classes = classes if classes is not None else synthetic.CLASSES
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps({"dataset": dataset, "classes": classes}))
    for split, labels in (("train", train_labels), ("test", test_labels)):
        for stem, lab in labels.items():
            shape = (image_shapes or {}).get(stem, lab.shape)
            img = np.full((*shape, 3), 128, np.uint8)
            _write(root / "images_detectron2" / split / f"{stem}{image_ext}", img)
            _write(root / "annotations_detectron2" / split / f"{stem}.png", lab)
    return root


@pytest.fixture
def tiny(tmp_path):
    train = {
        "a": _label([0, 1, 2]),            # base 0, 2; novel 1
        "b": _label([7, 255, 3, 12]),      # base 3; novel 7, 12 (255 ignored)
        "c": _label([255]),                # all ignore -> unusable
        "d": _label([3, 23]),              # base 3; novel 23
    }
    test = {"t0": _label([5, 16]), "t1": _label([255])}
    return make_dataset(tmp_path / "ds", train, test)


def test_catalog_class_tables():
    syn = catalog.class_table("synthetic")
    assert syn == synthetic.CLASSES and syn is not synthetic.CLASSES
    syn[0]["name"] = "changed"
    assert synthetic.CLASSES[0]["name"] == "clear sky"  # a copy, not the constant
    ade = catalog.class_table("ade20k")
    coco = catalog.class_table("coco_stuff_10k")
    assert len(ade) == 150 and ade[0]["name"] == "wall"
    assert len(coco) == 171 and coco[0]["name"] == "person"
    assert [c["id"] for c in coco] == list(range(171))
    with pytest.raises(ValueError, match="unknown dataset 'cityscapes'; allowed datasets: synthetic"):
        catalog.class_table("cityscapes")


def test_catalog_novel_ids_and_errors():
    assert catalog.novel_class_ids("synthetic", 1) == NOVEL1
    assert catalog.novel_class_ids("synthetic", 4) == synthetic.SPLITS[4]
    assert len(catalog.novel_class_ids("ade20k", 2)) == 38
    assert [len(catalog.novel_class_ids("coco_stuff_10k", s)) for s in range(1, 10)] == \
        [43, 43, 43, 43, 51, 59, 68, 76, 85]
    assert catalog.novel_class_ids("ade20k", 1)[:4] == [1, 3, 6, 8]
    with pytest.raises(ValueError, match=r"split 5 is out of range for dataset 'synthetic'; "
                                         r"allowed split ids: 1, 2, 3, 4$"):
        catalog.novel_class_ids("synthetic", 5)
    with pytest.raises(ValueError, match=r"split 0 is out of range for dataset 'synthetic'"):
        catalog.novel_class_ids("synthetic", 0)
    with pytest.raises(ValueError, match=r"dataset 'coco_stuff_10k'; allowed split ids: 1, 2, 3, 4, 5, 6, 7, 8, 9"):
        catalog.novel_class_ids("coco_stuff_10k", 10)


def test_catalog_excluded_and_load_class_table(tmp_path):
    ex = catalog.excluded_train_images("coco_stuff_10k")
    assert len(ex) == 7 and "COCO_train2014_000000016680" in ex
    assert catalog.excluded_train_images("ade20k") == set()
    assert catalog.excluded_train_images("synthetic") == set()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "classes.json")):
        catalog.load_class_table(tmp_path)
    (tmp_path / "classes.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"classes\.json is not valid JSON"):
        catalog.load_class_table(tmp_path)
    (tmp_path / "classes.json").write_text(json.dumps({"classes": [{"id": 1, "name": "x"}]}))
    with pytest.raises(ValueError, match="entry 0 has id 1"):
        catalog.load_class_table(tmp_path)
    (tmp_path / "classes.json").write_text(json.dumps({"dataset": "synthetic", "classes": synthetic.CLASSES}))
    assert catalog.load_class_table(tmp_path) == synthetic.CLASSES


def test_build_split_exact_contents(tiny):
    split, index = build_split(tiny, "synthetic", 1, progress=False)
    assert split == {"dataset": "synthetic", "split": 1, "num_classes": 24,
                     "base": [c for c in range(24) if c not in NOVEL1], "novel": NOVEL1,
                     "class_names": [c["name"] for c in synthetic.CLASSES]}
    tr = index["train"]
    assert [e["image"] for e in tr] == [f"images_detectron2/train/{s}.jpg" for s in "abcd"]
    assert [e["label"] for e in tr] == [f"annotations_detectron2/train/{s}.png" for s in "abcd"]
    assert [e["base"] for e in tr] == [[0, 2], [3], [], [3]]
    assert [e["novel"] for e in tr] == [[1], [7, 12], [], [23]]
    assert [e["usable"] for e in tr] == [True, True, False, True]
    assert [e["reason"] for e in tr] == ["", "", REASON_ALL_IGNORE, ""]
    assert REASON_ALL_IGNORE == "label is all 255 (ignore)"
    te = index["test"]
    assert [(e["image"], e["base"], e["novel"], e["usable"]) for e in te] == [
        ("images_detectron2/test/t0.jpg", [5], [16], True),
        ("images_detectron2/test/t1.jpg", [], [], False)]
    c2i = index["class_to_images"]
    assert set(c2i) == {"base", "novel"}
    assert sorted(c2i["novel"], key=int) == [str(c) for c in NOVEL1]
    assert c2i["novel"] == {"1": [0], "7": [1], "12": [1], "16": [], "20": [], "23": [3]}
    assert {k: v for k, v in c2i["base"].items() if v} == {"0": [0], "2": [0], "3": [1, 3]}
    assert len(c2i["base"]) == 18
    # another split of the same folder moves classes between base and novel
    split3, index3 = build_split(tiny, "synthetic", 3, progress=False)
    assert split3["novel"] == [0, 6, 10, 15, 18, 21]
    assert index3["train"][0]["base"] == [1, 2] and index3["train"][0]["novel"] == [0]


def test_build_split_workers_match_serial(tiny):
    assert build_split(tiny, "synthetic", 2, workers=2, progress=False) == \
        build_split(tiny, "synthetic", 2, workers=1, progress=False)


def test_excluded_coco_images_are_unusable(tmp_path):
    coco = catalog.class_table("coco_stuff_10k")
    train = {"COCO_train2014_000000016680": _label([0, 1]), "COCO_train2014_000000000009": _label([0, 3])}
    root = make_dataset(tmp_path / "coco", train, {"t": _label([2])}, dataset="coco_stuff_10k", classes=coco)
    _, index = build_split(root, "coco_stuff_10k", 1, progress=False)
    assert [e["usable"] for e in index["train"]] == [True, False]  # sorted: ...000009 first
    assert index["train"][1]["reason"] == REASON_EXCLUDED
    assert index["class_to_images"]["novel"]["3"] == [0]
    assert index["class_to_images"]["base"]["0"] == [0]  # the excluded image is left out


def test_size_mismatch_names_the_file(tmp_path):
    root = make_dataset(tmp_path / "ds", {"a": _label([0]), "b": _label([1])}, {"t": _label([2])},
                        image_shapes={"b": (8, 12)})
    with pytest.raises(ValueError, match=r"annotations_detectron2/train/b\.png is 8x10 \(HxW\) but its image "
                                         r".*images_detectron2/train/b\.jpg is 8x12"):
        build_split(root, "synthetic", 1, progress=False)


def test_label_errors_name_the_file(tmp_path):
    root = make_dataset(tmp_path / "ds", {"a": _label([0])}, {"t": _label([2])})
    lab = root / "annotations_detectron2/train/a.png"
    _write(lab, np.zeros((8, 10, 3), np.uint8))
    with pytest.raises(ValueError, match=r"label file .*train/a\.png is not single-channel"):
        build_split(root, "synthetic", 1, progress=False)
    lab.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot read label file .*train/a\.png"):
        build_split(root, "synthetic", 1, progress=False)
    _write(lab, _label([0, 30]))
    with pytest.raises(ValueError, match=r"train/a\.png holds ids \[30\] outside 0\.\.23"):
        build_split(root, "synthetic", 1, progress=False)
    lab.unlink()
    with pytest.raises(FileNotFoundError, match=r"label file .*annotations_detectron2/train/a\.png is missing"):
        build_split(root, "synthetic", 1, progress=False)


def test_empty_or_unusable_train_names_the_folder(tmp_path):
    root = make_dataset(tmp_path / "ds", {}, {"t": _label([2])})
    (root / "images_detectron2/train").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"image folder .*images_detectron2/train holds no images"):
        build_split(root, "synthetic", 1, progress=False)
    root2 = make_dataset(tmp_path / "ds2", {"a": _label([255])}, {"t": _label([2])})
    with pytest.raises(ValueError, match=r"no usable train image in .*annotations_detectron2/train"):
        build_split(root2, "synthetic", 1, progress=False)
    with pytest.raises(ValueError, match=r"split 7 is out of range for dataset 'synthetic'; allowed split ids: "
                                         r"1, 2, 3, 4"):
        build_split(root2, "synthetic", 7, progress=False)
    with pytest.raises(ValueError, match=r"holds dataset 'synthetic' .* asked for dataset 'ade20k'"):
        build_split(root2, "ade20k", 1, progress=False)


def test_image_size_from_headers(tmp_path):
    img = np.zeros((13, 21, 3), np.uint8)
    for ext in (".jpg", ".png"):
        _write(tmp_path / f"x{ext}", img)
        assert image_size(tmp_path / f"x{ext}") == (13, 21)
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"cannot read image .*bad\.jpg"):
        image_size(tmp_path / "bad.jpg")


def test_write_split_and_generated_dataset(tmp_path):
    from pipeline.config import SyntheticConfig
    ds = tmp_path / "dataset"
    synthetic.generate_dataset(ds, SyntheticConfig(num_train=8, num_test=3, image_size=48, jitter=1.0, cooccur=0.0), seed=3, progress=False)
    split, index = build_split(ds, "synthetic", 2, progress=False)
    assert len(index["train"]) == 8 and len(index["test"]) == 3
    assert all(e["usable"] for e in index["train"])
    for e in index["train"]:
        lab = cv2.imread(str(ds / e["label"]), cv2.IMREAD_UNCHANGED)
        ids = sorted(set(np.unique(lab).tolist()) - {255})       # 255: unlabelled clutter, never a class
        assert sorted(e["base"] + e["novel"]) == ids
        assert set(e["novel"]) <= set(synthetic.SPLITS[2])
    out = tmp_path / "split"
    write_split(out, split, index)
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "split.json"]
    assert json.loads((out / "split.json").read_text()) == split
    assert json.loads((out / "index.json").read_text()) == index
    write_split(out, {**split, "split": 9}, index)  # replaces the folder
    assert json.loads((out / "split.json").read_text())["split"] == 9
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
