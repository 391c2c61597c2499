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
import io
import json
import socket
import struct
import threading
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io

from pipeline.data.acquire import AcquireError, acquire_dataset
from pipeline.data.prepare import PrepareError, prepare_dataset
from pipeline.data.sources import get_source

CLASSES = json.loads((Path(__file__).parents[1] / "pipeline/data/classes.json").read_text())


@pytest.fixture(autouse=True)
def _no_internet(monkeypatch):
    """Any host other than the loopback fails name resolution, as on an offline machine."""
    real = socket.getaddrinfo

    def offline(host, *a, **k):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test: offline)")
        return real(host, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", offline)


# ----------------------------------------------------------------------------- archive builders

def _jpg(h, w, seed):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def _png(arr):
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def _mat(S):
    bio = io.BytesIO()
    scipy.io.savemat(bio, {"S": S, "names": np.array(["unlabeled", "person"], dtype=object)})
    return bio.getvalue()


ADE_TRAIN_1 = np.array([[0, 1, 150, 2],
                        [1, 1, 0, 150],
                        [75, 76, 149, 0]], np.uint8)
ADE_TRAIN_1_EXPECTED = np.array([[255, 0, 149, 1],
                                 [0, 0, 255, 149],
                                 [74, 75, 148, 255]], np.uint8)


def make_ade_zip(path, *, mismatch=False):
    lab2 = np.zeros((5, 7), np.uint8)  # all "other": prepared label all 255, kept here
    val = np.full((4, 4), 3, np.uint8)
    val[0, 0] = 0
    members = {
        "ADEChallengeData2016/objectInfo150.txt": b"Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n",
        "ADEChallengeData2016/sceneCategories.txt": b"ADE_train_00000001 airport_terminal\n",
        "ADEChallengeData2016/images/training/ADE_train_00000001.jpg": _jpg(3, 4, 1),
        "ADEChallengeData2016/images/training/ADE_train_00000002.jpg": _jpg(5, 7, 2),
        "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg": _jpg(6 if mismatch else 4, 4, 3),
        "ADEChallengeData2016/annotations/training/ADE_train_00000001.png": _png(ADE_TRAIN_1),
        "ADEChallengeData2016/annotations/training/ADE_train_00000002.png": _png(lab2),
        "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png": _png(val),
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for d in ("ADEChallengeData2016/", "ADEChallengeData2016/images/", "ADEChallengeData2016/annotations/"):
            zf.writestr(d, b"")
        for name, data in members.items():
            zf.writestr(name, data)
    return Path(path)


COCO_TRAIN = ["COCO_train2014_000000000077", "COCO_train2014_000000016680"]
COCO_TEST = ["COCO_train2014_000000000321"]
# coco ids: 0 unlabeled, 1 person, 2 bicycle, 92 banner (first stuff), 182 wood (last), 12 (not in table)
COCO_S1 = np.array([[0, 1, 2, 92],
                    [182, 182, 1, 0],
                    [12, 92, 0, 2]], np.uint16)
COCO_S1_EXPECTED = np.array([[255, 0, 1, 80],
                             [170, 170, 0, 255],
                             [255, 80, 255, 1]], np.uint8)


def make_coco_zip(path, *, mismatch=False):
    S2 = np.full((4, 5), 92, np.uint8)  # uint8 label maps occur too
    S3 = np.array([[1, 0], [182, 93], [0, 0]], np.uint16)
    members = {
        "cocostuff-10k-v1.1.json": b"{}",
        "imageLists/train.txt": ("\n".join(COCO_TRAIN) + "\n").encode(),
        "imageLists/test.txt": ("\n".join(COCO_TEST) + "\n").encode(),
        "imageLists/all.txt": ("\n".join(COCO_TRAIN + COCO_TEST) + "\n").encode(),
        f"images/{COCO_TRAIN[0]}.jpg": _jpg(3, 4, 4),
        f"images/{COCO_TRAIN[1]}.jpg": _jpg(4, 5, 5),
        f"images/{COCO_TEST[0]}.jpg": _jpg(3, 3 if mismatch else 2, 6),
        f"annotations/{COCO_TRAIN[0]}.mat": _mat(COCO_S1),
        f"annotations/{COCO_TRAIN[1]}.mat": _mat(S2),
        f"annotations/{COCO_TEST[0]}.mat": _mat(S3),
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return Path(path)


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

def _md5(path):
    return "md5:" + hashlib.md5(Path(path).read_bytes()).hexdigest()


def test_acquire_with_archive_in_place_offline(tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    arc = make_ade_zip(archives / "ADEChallengeData2016.zip")
    raw, out = tmp_path / "raw", tmp_path / "dataset"
    s = acquire_dataset("ade20k", out, raw, checksum=_md5(arc), archive_dir=str(archives),
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
