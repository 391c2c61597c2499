"""`python -m tools.predict`: a model trained a few steps on a dataset prepared from an archive
in the official ADE20K layout, run on images of mixed sizes (labels, overlays with a legend,
class shares, the ignore value), MLflow model references, batching and bad inputs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import predict as P
from tests.conftest import module_dir
from tests.helpers import ROOT, file_params, md5_checksum, png_bytes

ADE_TRAIN = {  # stem: (height, width) - several sizes, like real photos
    "ADE_train_00000001": (48, 64), "ADE_train_00000002": (64, 48),
    "ADE_train_00000003": (40, 40), "ADE_train_00000004": (56, 72),
}
ADE_VAL = {"ADE_val_00000001": (64, 64), "ADE_val_00000002": (50, 70), "ADE_val_00000003": (33, 45)}
# raw ADE values (class id + 1): wall(0), building(1, novel in split 1), sky(2), floor(3, novel)
BLOBS = (1, 2, 3, 4)


def _scene(h, w, seed):
    """An image and its raw ADE label: four coloured rectangles of four classes, a border of 0."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    lab = np.zeros((h, w), np.uint8)
    colors = {1: (200, 60, 60), 2: (60, 200, 60), 3: (60, 60, 200), 4: (200, 200, 60)}
    for i, v in enumerate(BLOBS):
        y0, x0 = (i // 2) * h // 2, (i % 2) * w // 2
        img[y0:y0 + h // 2, x0:x0 + w // 2] = colors[v]
        lab[y0:y0 + h // 2, x0:x0 + w // 2] = v
    lab[:2] = 0
    img = np.clip(img.astype(int) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    return img, lab


def make_official_ade_zip(path: Path) -> Path:
    """ADEChallengeData2016.zip as published: one top folder, images/annotations per split."""
    top = "ADEChallengeData2016"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{top}/objectInfo150.txt", "Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n")
        zf.writestr(f"{top}/sceneCategories.txt", "ADE_train_00000001 airport_terminal\n")
        for n, (split, sizes) in enumerate((("training", ADE_TRAIN), ("validation", ADE_VAL))):
            for k, (stem, (h, w)) in enumerate(sizes.items()):
                img, lab = _scene(h, w, 10 * n + k)
                ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
                assert ok
                zf.writestr(f"{top}/images/{split}/{stem}.jpg", jpg.tobytes())
                zf.writestr(f"{top}/annotations/{split}/{stem}.png", png_bytes(lab))
    return path


TINY_MODEL = {
    "data": {"dataset": "ade20k", "split": 1, "crop_size": 32, "prepare_workers": 1},
    "model": {"hidden_dim": 32, "num_queries": 8, "nheads": 2, "dec_layers": 2, "dim_feedforward": 64,
              "conv_dim": 32, "mask_dim": 32, "gn_groups": 8, "pretrained": "none"},
    "loss": {"sim_points": 10, "sim_base_points": 8, "pp_points": 10},
    "train": {"iterations": 3, "batch_size": 2, "threads": 1, "device": "cpu", "log_interval": 1,
              "checkpoint_interval": 3, "freeze": "none", "diagnostics_interval": 0},
}


@pytest.fixture(scope="module")
def ade_model(request, tmp_path_factory):
    """(model.pt, extracted archive root): the archive acquired and prepared by the download
    stage's code, split by the prepare stage's, a model trained 3 steps and exported.

    Three steps leave one class winning everywhere; ``sharp.pt`` is the same model with its
    class and mask-embedding heads scaled by 8, whose score maps vary within an image (two
    classes per image), so that boundaries, batching and legends are really exercised."""
    from pipeline.config import build_params
    from pipeline.data.acquire import acquire_dataset
    from pipeline.data.splits import build_split
    from pipeline.engine.train import export_model, train
    root = module_dir(request, tmp_path_factory, "ade_model")
    (root / "archives").mkdir()
    arc = make_official_ade_zip(root / "archives" / "ADEChallengeData2016.zip")
    acquire_dataset("ade20k", root / "dataset", root / "raw", checksum=f"ade20k={md5_checksum(arc)}",
                    archive_dir=str(arc.parent), progress=False, allow_network=False)
    split, index = build_split(root / "dataset", "ade20k", 1, progress=False)
    p = build_params(file_params(TINY_MODEL))
    model, out = train(p, root / "dataset", split, index, root / "ck.pt", progress=False)
    assert out.steps == 3
    export_model(model, p, split, root / "model.pt", out.history)
    with torch.no_grad():
        for prm in [*model.mask_embed.parameters(), model.class_embed.weight]:
            prm.mul_(8)
    export_model(model, p, split, root / "sharp.pt", out.history)
    with zipfile.ZipFile(arc) as zf:
        zf.extractall(root / "extracted")
    return root / "model.pt", root / "extracted" / "ADEChallengeData2016"


def _run_predict(*args, env=None) -> subprocess.CompletedProcess:
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "tools.predict", *map(str, args)], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=600)


def _label(path):
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert arr is not None and arr.dtype == np.uint8 and arr.ndim == 2
    return arr


def _rgb(path):
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _exact_color_pixels(img, color):
    return int(np.all(img == np.array(color, np.uint8), axis=-1).sum())


def test_predict_command_on_official_archive_images(ade_model, tmp_path):
    model_pt, tree = ade_model
    from pipeline.data.catalog import class_table
    ade = class_table("ade20k")
    inputs = tmp_path / "in"
    shutil.copytree(tree / "images", inputs)                          # training/ and validation/, 7 images
    (inputs / "validation" / "notes.txt").write_text("not an image")  # skipped: not an image suffix
    broken = inputs / "validation" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    textfile = tmp_path / "readme.txt"
    textfile.write_text("hello")
    out = tmp_path / "out"
    sharp = model_pt.with_name("sharp.pt")
    r = _run_predict("--model", sharp, "--out", out, "--no-progress", "--batch-size", "3", inputs, textfile)
    assert r.returncode == 1, r.stderr
    err_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 2, r.stderr
    assert any(str(broken) in ln and "cannot read" in ln for ln in err_lines)
    assert any(str(textfile) in ln and "cannot read" in ln for ln in err_lines)
    assert "Traceback" not in r.stderr
    assert "predicted 7 image(s)" in r.stdout and "2 input(s) failed" in r.stdout

    summary = pd.read_csv(out / "summary.csv", keep_default_na=False)
    assert list(summary.columns) == list(P.SUMMARY_COLUMNS)
    assert len(summary) == 9
    assert sorted(summary.loc[summary.status == "error", "output"]) == ["broken", "readme"]
    sizes = {**ADE_TRAIN, **ADE_VAL}
    n_classes = []
    for stem, (h, w) in sizes.items():
        row = summary.loc[summary.output == stem].iloc[0]
        assert row.status == "ok" and (int(row.height), int(row.width)) == (h, w)
        lab = _label(out / f"{stem}_label.png")
        assert lab.shape == (h, w)
        assert set(np.unique(lab).tolist()) <= set(range(150))        # min-score 0: every pixel has a class
        shares = pd.read_csv(out / f"{stem}_shares.csv", keep_default_na=False)
        assert list(shares.columns) == list(P.SHARES_COLUMNS)
        counts = np.bincount(lab.ravel(), minlength=256)
        assert shares["class_id"].tolist() == sorted(np.flatnonzero(counts).tolist(), key=lambda c: (-counts[c], c))
        assert shares["pixels"].tolist() == [int(counts[c]) for c in shares["class_id"]]
        assert shares["share"].sum() == pytest.approx(1.0)
        assert shares["name"].tolist() == [ade[c]["name"] for c in shares["class_id"]]
        assert row.classes == " ".join(str(c) for c in shares["class_id"])
        n_classes.append(len(shares))
        # overlay: the image on the left at its size, legend swatches in the dataset's colours
        ov = _rgb(out / f"{stem}_overlay.png")
        assert ov.shape[0] >= h and ov.shape[1] > w
        legend = ov[:, w:]
        for c in shares["class_id"]:
            assert _exact_color_pixels(legend, ade[c]["color"]) >= 14 * 14
        img = _rgb(inputs / ("training" if stem in ADE_TRAIN else "validation") / f"{stem}.jpg")
        expected = np.rint(0.5 * img + 0.5 * np.array([ade[c]["color"] for c in range(150)])[lab]).astype(np.uint8)
        assert np.abs(ov[:h, :w].astype(int) - expected.astype(int)).max() <= 1
    assert min(n_classes) >= 2  # boundaries inside every image

    # the ignore value: with a threshold no score reaches, every pixel is 255 ("none")
    out2 = tmp_path / "none"
    r = _run_predict("--model", model_pt, "--out", out2, "--no-progress", "--min-score", "1e9",
                     inputs / "validation" / "ADE_val_00000002.jpg")
    assert r.returncode == 0, r.stderr
    lab = _label(out2 / "ADE_val_00000002_label.png")
    assert lab.shape == ADE_VAL["ADE_val_00000002"] and (lab == 255).all()
    shares = pd.read_csv(out2 / "ADE_val_00000002_shares.csv", keep_default_na=False)
    assert shares.to_dict("records") == [{"class_id": 255, "name": "none", "pixels": 50 * 70, "share": 1.0}]
    ov = _rgb(out2 / "ADE_val_00000002_overlay.png")
    img = _rgb(inputs / "validation" / "ADE_val_00000002.jpg")
    np.testing.assert_array_equal(ov[:50, :70], img)                  # nothing blended in


def test_ignore_threshold_only_blanks_pixels(ade_model):
    model_pt, tree = ade_model
    pred = P.load_predictor(model_pt, torch.device("cpu"))
    img = P.read_image(tree / "images/validation/ADE_val_00000002.jpg")
    base = P.predict_arrays(pred, [img], 0.0)[0]
    lo, hi = 0.0, 64.0
    for _ in range(40):  # bisect to a threshold that blanks part of the image
        mid = (lo + hi) / 2
        frac = float((P.predict_arrays(pred, [img], mid)[0] == 255).mean())
        if frac == 0.0:
            lo = mid
        elif frac == 1.0:
            hi = mid
        else:
            break
    lab = P.predict_arrays(pred, [img], mid)[0]
    assert 0.0 < (lab == 255).mean() < 1.0
    kept = lab != 255
    np.testing.assert_array_equal(lab[kept], base[kept])              # a threshold never changes a class
    higher = P.predict_arrays(pred, [img], mid * 1.05)[0]
    assert ((higher == 255) | ~kept).sum() >= (~kept).sum() and (higher[~kept] == 255).all()


def test_batches_of_mixed_sizes_equal_one_at_a_time(ade_model, tmp_path):
    model_pt, tree = ade_model
    model_pt = model_pt.with_name("sharp.pt")
    pred = P.load_predictor(model_pt, torch.device("cpu"))
    paths = sorted((tree / "images").rglob("*.jpg"))
    groups: dict = {}
    for p in paths:
        shape = P.read_image(p).shape[:2]
        groups.setdefault(P.padded_key(pred, shape), set()).add(shape)
    assert len(groups) == 2 and all(len(sizes) >= 2 for sizes in groups.values())  # padded and cropped back
    one = P.predict_images(pred, paths, tmp_path / "one", batch_size=1, progress=False)
    many = P.predict_images(pred, paths, tmp_path / "many", batch_size=4, progress=False)
    assert (one.status == "ok").all() and (many.status == "ok").all()
    for p in paths:
        np.testing.assert_array_equal(_label(tmp_path / "one" / f"{p.stem}_label.png"),
                                      _label(tmp_path / "many" / f"{p.stem}_label.png"))
    # resized inference (the evaluation's test_short_edge) still writes labels at the image's size
    small = P.load_predictor(model_pt, torch.device("cpu"), short_edge=32)
    lab = P.predict_arrays(small, [P.read_image(paths[0])])[0]
    assert lab.shape == P.read_image(paths[0]).shape[:2]


@pytest.mark.parametrize("short_edge,max_edge", [(0, 0), (64, 0), (0, 48), (64, 80)])
def test_agrees_with_the_evaluation_inference(ade_model, short_edge, max_edge):
    """Predict and the evaluation resize test images with the one function (data.test_short_edge /
    data.test_max_edge; 0 = unchanged) and label them alike, for every resize setting. With
    short edge 0 and a max edge, the evaluation once kept the full size while predict capped it."""
    from pipeline.data.dataset import TestImages, test_size
    from pipeline.engine.evaluate import predict as eval_predict
    model_pt, tree = ade_model
    model_pt = model_pt.with_name("sharp.pt")
    pred = P.load_predictor(model_pt, torch.device("cpu"), short_edge=short_edge, max_edge=max_edge)
    images = sorted((tree / "images/validation").glob("*.jpg"))
    entries = [{"image": f"images/validation/{q.name}", "label": f"annotations/validation/{q.stem}.png"}
               for q in images]
    data = TestImages(tree, entries, short_edge, max_edge)
    agree, classes = [], []
    for i, q in enumerate(images):
        img = P.read_image(q)
        item = data[i]
        assert tuple(item["image"].shape[-2:]) == test_size(*img.shape[:2], short_edge, max_edge)
        if max_edge:
            assert max(item["image"].shape[-2:]) <= max_edge
        ours = P.predict_arrays(pred, [img])[0]
        theirs = eval_predict(pred.model, item["image"], tuple(item["sem_seg"].shape)).argmax(0).numpy()
        assert ours.shape == theirs.shape == img.shape[:2]
        classes.append(len(np.unique(theirs)))
        agree.append((ours == theirs).mean())
    assert max(classes) >= 2, classes               # boundaries are exercised
    assert min(agree) == 1.0, agree


def test_output_names_and_inputs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / ".hidden").mkdir(parents=True)
    for rel in ("a/x.jpg", "a/y.PNG", "b/x.png", "b/.hidden/z.jpg", "b/notes.txt"):
        (tmp_path / rel).write_bytes(b"")
    paths, problems = P.collect_images([tmp_path / "a", tmp_path / "b", tmp_path / "a" / "x.jpg",
                                        tmp_path / "missing.jpg", tmp_path / "b" / ".hidden"])
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["a/x.jpg", "a/y.PNG", "b/x.png", "b/.hidden/z.jpg"]
    assert [m for _, m in problems] == [f"{tmp_path / 'missing.jpg'} does not exist"]
    assert P.output_names(paths) == ["x", "y", "x-2", "z"]


def test_device_and_model_errors(ade_model, tmp_path):
    model_pt, _ = ade_model
    img = tmp_path / "i.png"
    cv2.imwrite(str(img), np.zeros((8, 8, 3), np.uint8))
    if not torch.cuda.is_available():
        r = _run_predict("--model", model_pt, "--out", tmp_path / "o", "--device", "cuda", img)
        assert r.returncode == 2 and "no CUDA device is available" in r.stderr
        from pipeline.engine.device import resolve_device
        assert resolve_device("auto", "--device") == torch.device("cpu")
    r = _run_predict("--model", tmp_path / "nope.pt", "--out", tmp_path / "o", img)
    assert r.returncode == 2 and "nope.pt" in r.stderr and "not an MLflow reference" in r.stderr
    (tmp_path / "fake.pt").write_bytes(b"not a checkpoint")
    r = _run_predict("--model", tmp_path / "fake.pt", "--out", tmp_path / "o", img)
    assert r.returncode == 2 and "fake.pt" in r.stderr and "Traceback" not in r.stderr
    r = _run_predict("--help")
    assert r.returncode == 0
    for word in ("runs:/<run_id>", "models:/<name>/<version>", "--batch-size", "--device", "_label.png",
                 "_overlay.png", "_shares.csv", "summary.csv", "255"):
        assert word in r.stdout


def test_mlflow_references(ade_model, tmp_path, monkeypatch):
    """runs:/<id>/model, a bare run id and models:/<name>/<version> from a real SQLite store,
    with the checkpoint as a raw artifact and nested in an MLflow-model-like folder."""
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    model_pt, _ = ade_model
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("predict-test", artifact_location=(tmp_path / "mlartifacts").as_uri())
    raw = client.create_run(exp).info.run_id
    client.log_artifact(raw, str(model_pt), "model")
    nested = client.create_run(exp).info.run_id
    pyfunc = tmp_path / "pyfunc"
    (pyfunc / "artifacts").mkdir(parents=True)
    (pyfunc / "MLmodel").write_text("flavors: {}\n")
    (pyfunc / "artifacts" / "notes.pt").write_bytes(b"not a checkpoint")
    shutil.copy(model_pt, pyfunc / "artifacts" / "model.pt")
    client.log_artifacts(nested, str(pyfunc), "simformer_model")
    client.create_registered_model("simformer-test")
    client.create_model_version("simformer-test", f"runs:/{raw}/model", run_id=raw)
    want = model_pt.read_bytes()
    for ref in (f"runs:/{raw}/model", raw, nested, "models:/simformer-test/1"):
        got = P.resolve_model(ref, tmp_path / f"dl-{len(ref)}-{ref[-4:]}", uri)
        assert got.name == "model.pt" and got.read_bytes() == want, ref
    empty = client.create_run(exp).info.run_id
    with pytest.raises(P.PredictError, match=f"model '{empty}'.*no trained-model checkpoint"):
        P.resolve_model(empty, tmp_path / "dl-empty", uri)
    # the command: the env var names the store; the run id is resolved, predicted, exit 0
    img = tmp_path / "i.png"
    cv2.imwrite(str(img), np.full((20, 30, 3), 120, np.uint8))
    r = _run_predict("--model", raw, "--out", tmp_path / "o", "--no-progress", img,
                     env={"MLFLOW_TRACKING_URI": uri})
    assert r.returncode == 0, r.stderr
    assert _label(tmp_path / "o" / "i_label.png").shape == (20, 30)


def test_overlay_legend_lists_the_classes_present():
    names = ["wall", "building, edifice", "sky", "floor, flooring"]
    colors = np.array([[200, 30, 90], [180, 120, 120], [6, 230, 230], [80, 50, 50]], np.uint8)
    label = np.full((30, 40), 2, np.uint8)
    label[:10] = 1
    label[10:12, :5] = 255
    img = np.full((30, 40, 3), 100, np.uint8)
    canvas, entries = P.overlay_with_legend(img, label, names, colors, alpha=0.5)
    assert [(e.class_id, e.name) for e in entries] == [(2, "sky"), (1, "building, edifice"), (255, "none")]
    assert [round(e.share, 4) for e in entries] == [round(790 / 1200, 4), round(400 / 1200, 4), round(10 / 1200, 4)]
    assert canvas.shape[1] > 40 and canvas.shape[0] >= 30
    for e in entries[:2]:
        x0, y0, x1, y1 = e.box
        assert x0 >= 40 and (canvas[y0:y1 + 1, x0:x1 + 1] == colors[e.class_id]).all()
    assert (canvas[11, 2] == 100).all()                                  # 255: the image as it is
    assert (canvas[20, 20] == np.rint(0.5 * 100 + 0.5 * colors[2])).all()
    assert _exact_color_pixels(canvas[:, 40:], colors[0]) == 0            # wall is absent: no swatch
    shares = P.class_shares(label, names)
    assert shares["class_id"].tolist() == [2, 1, 255] and shares["pixels"].tolist() == [790, 400, 10]
