"""Real-dataset preparation and acquisition on tiny archives in the exact official formats.

ADEChallengeData2016.zip: ``ADEChallengeData2016/images/{training,validation}/*.jpg``,
``ADEChallengeData2016/annotations/{training,validation}/*.png`` (values 0..150),
``objectInfo150.txt``. cocostuff-10k-v1.1.zip: ``images/*.jpg``, ``annotations/*.mat``
(MATLAB v5, key ``S``), ``imageLists/{train,test}.txt``. No internet: a local server only.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import struct
import threading
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.data.acquire import AcquireError, acquire_dataset
from pipeline.data.prepare import PrepareError, prepare_dataset
from pipeline.data.sources import get_source
from tests.helpers import (ADE_TRAIN_1_EXPECTED, COCO_S1, COCO_S1_EXPECTED, COCO_TEST, COCO_TRAIN, make_ade_zip,
                           make_coco_zip, md5_checksum)

pytestmark = pytest.mark.usefixtures("no_internet")      # any host but the loopback fails name resolution

CLASSES = json.loads((Path(__file__).parents[1] / "pipeline/data/classes.json").read_text())


def _extract(zip_path, folder):
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(folder)
    return Path(folder)


def _label(path):
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert arr is not None and arr.dtype == np.uint8 and arr.ndim == 2
    return arr


# ----------------------------------------------------------------------------- preparation

def test_prepare_ade20k_labels_and_layout(tmp_path):
    src = _extract(make_ade_zip(tmp_path / "ade.zip"), tmp_path / "src")
    out = tmp_path / "dataset"
    summary = prepare_dataset("ade20k", src, out, workers=1, progress=False)
    assert summary["train"] == 2 and summary["test"] == 1 and summary["num_classes"] == 150
    ann = out / "annotations_detectron2"
    np.testing.assert_array_equal(_label(ann / "train/ADE_train_00000001.png"), ADE_TRAIN_1_EXPECTED)
    assert (_label(ann / "train/ADE_train_00000002.png") == 255).all()  # kept, skipped later by the index
    val = _label(ann / "test/ADE_val_00000001.png")
    assert val[0, 0] == 255 and (val.ravel()[1:] == 2).all()
    imgs = out / "images_detectron2"
    assert sorted(p.name for p in (imgs / "train").iterdir()) == ["ADE_train_00000001.jpg", "ADE_train_00000002.jpg"]
    assert [p.name for p in (imgs / "test").iterdir()] == ["ADE_val_00000001.jpg"]
    # images copied byte for byte
    assert (imgs / "train/ADE_train_00000001.jpg").read_bytes() == \
        (src / "ADEChallengeData2016/images/training/ADE_train_00000001.jpg").read_bytes()
    table = json.loads((out / "classes.json").read_text())
    assert table["dataset"] == "ade20k" and len(table["classes"]) == 150
    assert table["classes"][0] == {k: CLASSES["ade20k"][0][k] for k in ("id", "name", "isthing", "color")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ade.zip", "dataset", "src"]  # no temp folders


def test_prepare_coco_labels_and_layout(tmp_path):
    src = _extract(make_coco_zip(tmp_path / "coco.zip"), tmp_path / "src")
    out = tmp_path / "dataset"
    summary = prepare_dataset("coco_stuff_10k", src, out, workers=1, progress=False)
    assert summary["train"] == 2 and summary["test"] == 1 and summary["num_classes"] == 171
    assert summary["unknown_label_values"] == {"12": 1}
    ann = out / "annotations_detectron2"
    got = _label(ann / f"train/{COCO_TRAIN[0]}.png")
    np.testing.assert_array_equal(got, COCO_S1_EXPECTED)
    # the same expectation derived from the table: coco_id -> row index, 0 -> 255
    rows = {c["coco_id"]: i for i, c in enumerate(CLASSES["coco_stuff_10k"])}
    derived = np.vectorize(lambda v: rows.get(int(v), 255))(COCO_S1).astype(np.uint8)
    np.testing.assert_array_equal(got, derived)
    assert (_label(ann / f"train/{COCO_TRAIN[1]}.png") == 80).all()
    np.testing.assert_array_equal(_label(ann / f"test/{COCO_TEST[0]}.png"),
                                  np.array([[0, 255], [170, 81], [255, 255]], np.uint8))
    assert sorted(p.name for p in (out / "images_detectron2/train").iterdir()) == [n + ".jpg" for n in COCO_TRAIN]
    table = json.loads((out / "classes.json").read_text())
    assert table["dataset"] == "coco_stuff_10k" and len(table["classes"]) == 171
    assert [c["id"] for c in table["classes"]] == list(range(171))


def test_prepare_parallel_workers_match_serial(tmp_path):
    src = _extract(make_coco_zip(tmp_path / "coco.zip"), tmp_path / "src")
    prepare_dataset("coco_stuff_10k", src, tmp_path / "serial", workers=1, progress=False)
    prepare_dataset("coco_stuff_10k", src, tmp_path / "parallel", workers=2, progress=False)
    for split, names in (("train", COCO_TRAIN), ("test", COCO_TEST)):
        for n in names:
            np.testing.assert_array_equal(_label(tmp_path / f"serial/annotations_detectron2/{split}/{n}.png"),
                                          _label(tmp_path / f"parallel/annotations_detectron2/{split}/{n}.png"))


def _with_exif_orientation(jpg: bytes, orientation: int) -> bytes:
    tiff = (b"MM\x00*\x00\x00\x00\x08" + struct.pack(">H", 1)
            + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0))
    app1 = b"Exif\x00\x00" + tiff
    return jpg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpg[2:]


def test_exif_rotated_image_written_unrotated(tmp_path):
    src = _extract(make_coco_zip(tmp_path / "coco.zip"), tmp_path / "src")
    img = src / f"images/{COCO_TRAIN[0]}.jpg"  # stored 4x3 (WxH) like its label; EXIF says rotate 90
    img.write_bytes(_with_exif_orientation(img.read_bytes(), 6))
    assert cv2.imread(str(img)).shape[:2] == (4, 3)
    out = tmp_path / "dataset"
    summary = prepare_dataset("coco_stuff_10k", src, out, progress=False)
    assert summary["reoriented_images"] == [COCO_TRAIN[0]]
    written = out / f"images_detectron2/train/{COCO_TRAIN[0]}.png"
    assert cv2.imread(str(written)).shape[:2] == (3, 4)
    assert not (out / f"images_detectron2/train/{COCO_TRAIN[0]}.jpg").exists()


@pytest.mark.parametrize("dataset,maker,bad_name", [
    ("ade20k", make_ade_zip, "ADE_val_00000001"),
    ("coco_stuff_10k", make_coco_zip, COCO_TEST[0]),
])
def test_size_mismatch_names_the_file(tmp_path, dataset, maker, bad_name):
    src = _extract(maker(tmp_path / "a.zip", mismatch=True), tmp_path / "src")
    out = tmp_path / "dataset"
    with pytest.raises(PrepareError) as ei:
        prepare_dataset(dataset, src, out, workers=1, progress=False)
    assert bad_name in str(ei.value) and "size mismatch" in str(ei.value)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "src"]


def test_missing_label_and_wrong_tree(tmp_path):
    src = _extract(make_coco_zip(tmp_path / "coco.zip"), tmp_path / "src")
    (src / f"annotations/{COCO_TRAIN[1]}.mat").unlink()
    with pytest.raises(PrepareError, match=COCO_TRAIN[1]):
        prepare_dataset("coco_stuff_10k", src, tmp_path / "out", progress=False)
    with pytest.raises(PrepareError, match="cocostuff-10k-v1.1.zip"):
        prepare_dataset("coco_stuff_10k", tmp_path / "nothing-here", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- acquisition


def test_acquire_with_archive_in_place_offline(tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    arc = make_ade_zip(archives / "ADEChallengeData2016.zip")
    raw, out = tmp_path / "raw", tmp_path / "dataset"
    s = acquire_dataset("ade20k", out, raw, checksum=md5_checksum(arc), archive_dir=str(archives),
                        progress=False, allow_network=False)
    assert s["downloaded"] is False and s["train"] == 2 and s["test"] == 1
    assert s["archive"] == str(arc)
    np.testing.assert_array_equal(_label(out / "annotations_detectron2/train/ADE_train_00000001.png"),
                                  ADE_TRAIN_1_EXPECTED)
    assert list(raw.iterdir()) == []  # temporary extraction removed

    # the pinned official md5 does not match this tiny archive: a clear error, nothing prepared
    with pytest.raises(AcquireError) as ei:
        acquire_dataset("ade20k", tmp_path / "other", raw, archive_dir=str(archives), progress=False,
                        allow_network=False)
    msg = str(ei.value)
    assert "7328b3957e407ddae1d3cbf487f149ef" in msg and str(arc) in msg
    assert not (tmp_path / "other").exists()


def test_acquire_coco_records_sha256_on_first_use(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "dataset"
    raw.mkdir()
    arc = make_coco_zip(raw / "cocostuff-10k-v1.1.zip")
    s1 = acquire_dataset("coco_stuff_10k", out, raw, progress=False, allow_network=False)
    record = raw / "cocostuff-10k-v1.1.zip.sha256"
    digest = hashlib.sha256(arc.read_bytes()).hexdigest()
    assert record.read_text() == f"{digest}  cocostuff-10k-v1.1.zip\n"
    assert s1["sha256_record_written"] is True and s1["sha256"] == digest
    s2 = acquire_dataset("coco_stuff_10k", out, raw, progress=False, allow_network=False)
    assert s2["sha256_record_written"] is False and "recorded" in s2["verification"]
    # a different copy no longer matches the recorded digest
    make_coco_zip(arc, mismatch=True)
    with pytest.raises(AcquireError) as ei:
        acquire_dataset("coco_stuff_10k", out, raw, progress=False, allow_network=False)
    assert digest in str(ei.value) and str(record) in str(ei.value)


def test_acquire_coco_corrupt_archive_not_recorded(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    data = make_coco_zip(tmp_path / "good.zip").read_bytes()
    (raw / "cocostuff-10k-v1.1.zip").write_bytes(data[: len(data) - 200])  # truncated download
    with pytest.raises(AcquireError, match="cocostuff-10k-v1.1.zip.*truncated or corrupt"):
        acquire_dataset("coco_stuff_10k", tmp_path / "dataset", raw, progress=False, allow_network=False)
    assert not (raw / "cocostuff-10k-v1.1.zip.sha256").exists()
    assert not (tmp_path / "dataset").exists()
    assert sorted(p.name for p in raw.iterdir()) == ["cocostuff-10k-v1.1.zip"]


@pytest.mark.parametrize("dataset", ["ade20k", "coco_stuff_10k"])
@pytest.mark.parametrize("allow_network", [False, True])
def test_acquire_no_archive_no_network_message(tmp_path, dataset, allow_network):
    src = get_source(dataset)
    raw = tmp_path / "raw"
    with pytest.raises(AcquireError) as ei:
        acquire_dataset(dataset, tmp_path / "dataset", raw, progress=False, allow_network=allow_network)
    msg = str(ei.value)
    assert src.url in msg and src.archive_name in msg and str(raw) in msg
    if allow_network:  # the simulated offline resolver answered, not a real one
        assert "test: offline" in msg
    assert not (tmp_path / "dataset").exists()


@pytest.fixture
def file_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_acquire_downloads_from_mirror(tmp_path, file_server):
    root, base = file_server
    make_coco_zip(root / "mirror-copy.zip")
    raw, out = tmp_path / "raw", tmp_path / "dataset"
    s = acquire_dataset("coco_stuff_10k", out, raw, url=f"{base}/mirror-copy.zip", progress=False, workers=1)
    assert s["downloaded"] is True and s["train"] == 2
    assert (raw / "cocostuff-10k-v1.1.zip").read_bytes() == (root / "mirror-copy.zip").read_bytes()
    assert (raw / "cocostuff-10k-v1.1.zip.sha256").is_file()
    assert sorted(p.name for p in raw.iterdir()) == ["cocostuff-10k-v1.1.zip", "cocostuff-10k-v1.1.zip.sha256"]
    np.testing.assert_array_equal(_label(out / f"annotations_detectron2/train/{COCO_TRAIN[0]}.png"), COCO_S1_EXPECTED)
