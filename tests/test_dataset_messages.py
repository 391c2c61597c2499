"""Local archives that just work and preparation messages that help.

Tiny archives in the official layouts (builders in tests/helpers.py), changed one member at a
time: per-dataset checksum overrides and messages naming the key, no first-use pin for an
archive that fails preparation, member paths (never the temporary folder) in errors, the real
variables of a ``.mat``, counted and reported unexpected label values, the restore hint after a
failed ``download`` under DVC, and a prepare stage whose pool workers end quietly.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import yaml

from pipeline.data.acquire import AcquireError, acquire_dataset
from pipeline.data.prepare import prepare_dataset, unknown_values_warning
from pipeline.data.sources import scoped_override
from tests.helpers import (COCO_TEST, COCO_TRAIN, ROOT, dvc, make_ade_zip, make_coco_zip, make_project, md5_checksum,
                           png_bytes, project_env, tiny_params)

pytestmark = pytest.mark.usefixtures("no_internet")      # any host but the loopback fails name resolution

ADE_MD5 = "md5:7328b3957e407ddae1d3cbf487f149ef"


def _rezip(src: Path, dst: Path, replace: dict[str, bytes]) -> Path:
    """Copy the zip ``src`` to ``dst`` with the members named in ``replace`` swapped (or added)."""
    with zipfile.ZipFile(src) as zin:
        members = {i.filename: zin.read(i) for i in zin.infolist()}
    members.update(replace)
    tmp = dst.with_name(dst.name + ".new")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for name, data in members.items():
            zout.writestr(name, data)
    os.replace(tmp, dst)
    return dst


def _mat(**variables) -> bytes:
    bio = io.BytesIO()
    scipy.io.savemat(bio, variables)
    return bio.getvalue()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- checksum keys

def test_scoped_override_parsing():
    both = "ade20k=md5:" + "a" * 32 + ", coco_stuff_10k=sha256:" + "b" * 64
    assert scoped_override(both, "ade20k") == "md5:" + "a" * 32
    assert scoped_override(both, "coco_stuff_10k") == "sha256:" + "b" * 64
    assert scoped_override("ade20k=md5:" + "a" * 32, "coco_stuff_10k") == ""
    assert scoped_override("md5:" + "a" * 32, "coco_stuff_10k") == "md5:" + "a" * 32  # unscoped: every dataset
    assert scoped_override("", "ade20k") == ""
    url = "http://mirror/x.zip?token=abc"
    assert scoped_override(url, "ade20k", "data.url") == url
    assert scoped_override(f"coco_stuff_10k={url}", "coco_stuff_10k", "data.url") == url
    with pytest.raises(ValueError, match=r"data\.checksum .*'md5:x' must read <dataset>=<value>"):
        scoped_override("ade20k=md5:y md5:x", "ade20k")
    with pytest.raises(ValueError, match="'ade20k' is given twice"):
        scoped_override("ade20k=md5:a ade20k=md5:b", "ade20k")


def test_ade_override_left_in_params_does_not_reject_coco(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    make_coco_zip(raw / "cocostuff-10k-v1.1.zip")
    ade_override = "ade20k=md5:" + "0" * 32
    s = acquire_dataset("coco_stuff_10k", tmp_path / "dataset", raw, checksum=ade_override, progress=False,
                        allow_network=False)
    assert s["train"] == 2 and s["sha256_record_written"] is True
    # the same value unscoped applies to COCO too: the message names the key and the way out
    with pytest.raises(AcquireError) as ei:
        acquire_dataset("coco_stuff_10k", tmp_path / "dataset2", raw, checksum="md5:" + "0" * 32,
                        progress=False, allow_network=False)
    msg = str(ei.value)
    actual = hashlib.md5((raw / "cocostuff-10k-v1.1.zip").read_bytes()).hexdigest()
    assert "data.checksum override in params.yaml" in msg and "applies to every dataset" in msg
    assert "'<dataset>=...'" in msg and f"data.checksum: coco_stuff_10k=md5:{actual}" in msg
    assert not (tmp_path / "dataset2").exists()


def test_pinned_checksum_mismatch_names_the_key(tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    arc = make_ade_zip(archives / "ADEChallengeData2016.zip")
    with pytest.raises(AcquireError) as ei:
        acquire_dataset("ade20k", tmp_path / "dataset", tmp_path / "raw", archive_dir=str(archives),
                        progress=False, allow_network=False)
    msg = str(ei.value)
    assert ADE_MD5 in msg and "pinned checksum of the official ADEChallengeData2016.zip" in msg
    assert f"`data.checksum: ade20k={md5_checksum(arc)}`" in msg
    # following the advice works
    s = acquire_dataset("ade20k", tmp_path / "dataset", tmp_path / "raw", archive_dir=str(archives),
                        checksum=f"ade20k={md5_checksum(arc)}", progress=False, allow_network=False)
    assert s["train"] == 2 and s["verification"] == "md5 given checksum"


# ----------------------------------------------------------------------------- pin, paths, keys

def test_coco_archive_that_fails_preparation_is_not_pinned(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    good = make_coco_zip(tmp_path / "good.zip")
    arc = raw / "cocostuff-10k-v1.1.zip"
    member = f"annotations/{COCO_TRAIN[0]}.mat"
    _rezip(good, arc, {member: _mat(labelMap=np.ones((3, 4), np.uint16),
                                    names=np.array(["unlabeled", "person"], dtype=object))})
    with pytest.raises(AcquireError) as ei:
        acquire_dataset("coco_stuff_10k", tmp_path / "dataset", raw, progress=False, allow_network=False)
    msg = str(ei.value)
    assert f"label {member} in {arc} has no variable 'S'" in msg          # the member path
    assert ".extract-" not in msg
    assert "labelMap (3x4 " in msg and "names (1x2 cell)" in msg            # the real keys
    assert "Nothing was recorded in cocostuff-10k-v1.1.zip.sha256" in msg
    assert _leftovers(raw) == ["cocostuff-10k-v1.1.zip"]                 # not pinned
    assert not (tmp_path / "dataset").exists()
    # a good copy put in its place is accepted and pinned
    shutil.copy(good, arc)
    s = acquire_dataset("coco_stuff_10k", tmp_path / "dataset", raw, progress=False, allow_network=False)
    assert s["sha256_record_written"] is True
    assert (raw / "cocostuff-10k-v1.1.zip.sha256").read_text().split()[0] == hashlib.sha256(good.read_bytes()).hexdigest()


def test_size_mismatch_names_both_members(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    arc = make_coco_zip(raw / "cocostuff-10k-v1.1.zip", mismatch=True)
    with pytest.raises(AcquireError) as ei:
        acquire_dataset("coco_stuff_10k", tmp_path / "dataset", raw, progress=False, allow_network=False)
    msg = str(ei.value)
    assert (f"size mismatch: image images/{COCO_TEST[0]}.jpg in {arc} is 3x3 (WxH) but its label "
            f"annotations/{COCO_TEST[0]}.mat in {arc} is 2x3") in msg
    assert ".extract-" not in msg
    assert _leftovers(raw) == ["cocostuff-10k-v1.1.zip"]


def test_wrong_tree_names_the_archive(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    arc = _rezip(make_ade_zip(tmp_path / "ade.zip"), raw / "cocostuff-10k-v1.1.zip", {})  # ADE under COCO's name
    with pytest.raises(AcquireError) as ei:
        acquire_dataset("coco_stuff_10k", tmp_path / "dataset", raw, progress=False, allow_network=False)
    msg = str(ei.value)
    assert f"no dataset tree (imageLists/train.txt, annotations) found in the archive {arc}" in msg
    assert "ADEChallengeData2016" in msg and ".extract-" not in msg


# ----------------------------------------------------------------------------- unexpected values

def test_unexpected_label_values_counted_and_warned(tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    lab = np.array([[0, 1, 151, 2], [200, 200, 0, 150], [75, 76, 149, 151]], np.uint8)
    val = np.full((4, 4), 200, np.uint8)
    arc = _rezip(make_ade_zip(tmp_path / "ade.zip"), archives / "ADEChallengeData2016.zip", {
        "ADEChallengeData2016/annotations/training/ADE_train_00000001.png": png_bytes(lab),
        "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png": png_bytes(val)})
    out = tmp_path / "dataset"
    s = acquire_dataset("ade20k", out, tmp_path / "raw", checksum=f"ade20k={md5_checksum(arc)}", archive_dir=str(archives),
                        progress=False, allow_network=False)
    assert s["unknown_label_values"] == {"151": 1, "200": 2}          # images per value
    assert s["unknown_label_pixels"] == {"151": 2, "200": 18}         # pixels per value
    kept = json.loads((out / "preparation.json").read_text())
    assert kept["unknown_label_values"] == {"151": 1, "200": 2} and kept["unknown_label_pixels"]["200"] == 18
    assert unknown_values_warning(s) == (
        "warning: ade20k: 2 label values not in the class table (0..150) were set to 255 (ignore): "
        "151 (2 pixels in 1 image), 200 (18 pixels in 2 images). The official archive holds none: "
        "is this a modified copy?")
    # COCO: ids without a row (12 and 26 are unused COCO ids)
    src = tmp_path / "coco"
    with zipfile.ZipFile(make_coco_zip(tmp_path / "coco.zip")) as zf:
        zf.extractall(src)
    s2 = np.array([[26, 26, 92], [12, 0, 1]], np.uint16)
    (src / f"annotations/{COCO_TRAIN[1]}.mat").write_bytes(_mat(S=s2))
    (src / f"images/{COCO_TRAIN[1]}.jpg").write_bytes(_jpg_bytes(2, 3))
    c = prepare_dataset("coco_stuff_10k", src, tmp_path / "coco_out", progress=False)
    assert c["unknown_label_values"] == {"12": 2, "26": 1} and c["unknown_label_pixels"] == {"12": 2, "26": 2}
    assert "12 (2 pixels in 2 images), 26 (2 pixels in 1 image)" in unknown_values_warning(c)
    assert unknown_values_warning({"dataset": "ade20k", "unknown_label_values": {}}) == ""


def _jpg_bytes(h, w):
    import cv2
    ok, buf = cv2.imencode(".jpg", np.full((h, w, 3), 90, np.uint8))
    assert ok
    return buf.tobytes()


def _stage_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("DVC_STAGE", None)
    return env


def test_download_stage_prints_the_warning_and_counts(tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    lab = np.array([[0, 1, 151, 2], [1, 1, 0, 150], [75, 76, 149, 0]], np.uint8)
    arc = _rezip(make_ade_zip(tmp_path / "ade.zip"), archives / "ADEChallengeData2016.zip",
                 {"ADEChallengeData2016/annotations/training/ADE_train_00000001.png": png_bytes(lab)})
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    # both datasets scoped: only the ADE20K entry applies
    params["data"].update({"dataset": "ade20k", "archive_dir": str(archives), "prepare_workers": 1,
                           "checksum": f"coco_stuff_10k=sha256:{'0' * 64}, ade20k={md5_checksum(arc)}"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = subprocess.run([sys.executable, "-m", "stages.download", "--params", str(tmp_path / "params.yaml"),
                        "--out", str(tmp_path / "dataset"), "--raw", str(tmp_path / "raw"), "--no-progress"],
                       cwd=ROOT, env=_stage_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "warning: ade20k: 1 label value not in the class table (0..150) were set to 255 (ignore): " \
           "151 (1 pixels in 1 image)" in r.stderr
    assert "unknown_label_values=151:1img/1px" in r.stdout and "train=2" in r.stdout


# ----------------------------------------------------------------------------- restore hint

def test_failed_download_under_dvc_says_how_to_restore(tmp_path):
    params = tiny_params()
    project = make_project(tmp_path / "proj", params)
    dvc(project, "repro", "download")
    first = sorted(p.relative_to(project).as_posix() for p in (project / "data/dataset").rglob("*"))
    assert first
    archives = tmp_path / "archives"
    archives.mkdir()
    (archives / "cocostuff-10k-v1.1.zip").write_bytes(b"PK\x03\x04 not really a zip")
    params["data"].update({"dataset": "coco_stuff_10k", "archive_dir": str(archives)})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro", "download"], cwd=project,
                       env=project_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert "is not a readable zip file" in err
    assert "DVC removed the previous data/dataset before running this stage; `dvc checkout data/dataset` " \
           "restores the last committed version" in err
    assert not (project / "data/dataset").exists()
    # the advice works: the previous dataset is back, file for file
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    dvc(project, "checkout", "data/dataset")
    assert sorted(p.relative_to(project).as_posix() for p in (project / "data/dataset").rglob("*")) == first


def test_restore_hint_only_under_dvc(tmp_path, monkeypatch):
    from stages.download import restore_hint
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert restore_hint(tmp_path / "gone") == ""
    monkeypatch.setenv("DVC_STAGE", "download")
    assert restore_hint(tmp_path) == ""  # still there: nothing to restore
    assert f"`dvc checkout {tmp_path / 'gone'}`" in restore_hint(tmp_path / "gone")


def test_prepare_stage_with_workers_prints_no_traceback(tmp_path):
    from pipeline.config import build_params
    from pipeline.data.synthetic import generate_dataset
    params = tiny_params()
    params["data"]["prepare_workers"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p = build_params(params)
    generate_dataset(tmp_path / "dataset", p.data.synthetic, p.base.seed, progress=False)
    for _ in range(3):  # the traceback came on most runs, not all
        r = subprocess.run([sys.executable, "-m", "stages.prepare", "--params", str(tmp_path / "params.yaml"),
                            "--dataset-dir", str(tmp_path / "dataset"), "--out", str(tmp_path / "split"),
                            "--no-progress"], cwd=ROOT, env=_stage_env(), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr
        assert "16/16 usable training images" in r.stdout
