"""Convert an extracted real dataset into the prepared layout (docs/ARCHITECTURE.md).

```
<out_dir>/images_detectron2/{train,test}/<stem>.jpg        images (bytes copied unchanged)
<out_dir>/annotations_detectron2/{train,test}/<stem>.png   uint8 labels 0..K-1, 255 = ignore
<out_dir>/classes.json                                     {"dataset": ..., "classes": [...]}
<out_dir>/preparation.json                                 the summary of prepare_dataset
```

* ADE20K (``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` with
  ``annotations/<split>/<stem>.png``; label ``png - 1`` as uint8 (0 "other" -> 255,
  1..150 -> 0..149; any value above 150 -> 255, counted per value in the summary and warned
  about). training -> train, validation -> test.
* COCO-Stuff-10K v1.1: ``imageLists/{train,test}.txt`` name the images ``images/<name>.jpg``
  and labels ``annotations/<name>.mat`` (MATLAB v5, key ``S``); each COCO-Stuff id maps to
  its row in ``classes.json`` (``coco_id`` column), 0 (unlabeled) and ids not in the table
  -> 255 (the latter counted per id and warned about, as for ADE20K).

Every image is decoded once to check that its size equals its label's size (the error
names both files). An image whose size only matches after ignoring its EXIF orientation tag
is written as ``<stem>.png`` with its stored (unrotated) pixels, so that any reader agrees
with the label. All images are kept (skipping ADE20K's all-255 and COCO's 7 listed images
is the split index's job). The output folder is built under a temporary name and renamed
into place (``atomic_dir``); conversion runs in a process pool with a tqdm bar.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.data.sources import ADE20K_SPLITS, COCO_SPLITS, get_source
from pipeline.io import atomic_dir, write_json
from pipeline.jobs import run_parallel

from pipeline.data import IGNORE

SUMMARY_FILE = "preparation.json"  # the summary below, kept beside classes.json (read by reports)
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_CLASSES_JSON = Path(__file__).with_name("classes.json")


class PrepareError(RuntimeError):
    """The extracted dataset is incomplete or inconsistent (the message names the file)."""


# ---------------------------------------------------------------------------- class tables

def _class_table(dataset: str) -> list[dict]:
    try:  # the shared catalog when it exists, else the JSON file directly
        from pipeline.data.catalog import class_table  # type: ignore
        return list(class_table(dataset))
    except ImportError:
        with open(_CLASSES_JSON, encoding="utf-8") as f:
            return list(json.load(f)[dataset])


def ade20k_lut() -> np.ndarray:
    """Lookup table over raw ADE20K values 0..255 (+1 sentinel): 0 -> 255, v -> v-1 (1..150)."""
    lut = np.full(257, IGNORE, np.uint8)
    lut[1:151] = np.arange(150, dtype=np.uint8)
    return lut


def coco_lut(classes: list[dict] | None = None) -> np.ndarray:
    """Lookup table over COCO-Stuff ids 0..65535 (+1 sentinel): coco_id -> row, others -> 255."""
    classes = _class_table("coco_stuff_10k") if classes is None else classes
    lut = np.full(65537, IGNORE, np.uint8)
    for row, c in enumerate(classes):
        lut[int(c["coco_id"])] = row
    lut[0] = IGNORE
    return lut


def apply_lut(arr: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map an integer label array through ``lut``; values outside the table -> 255."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError("label map holds non-integer values")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind == "b":
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"label map has non-numeric dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 2 and len(lut) > np.iinfo(arr.dtype).max:
        return lut[arr]
    idx = arr.astype(np.int64)
    idx[(idx < 0) | (idx >= len(lut) - 1)] = len(lut) - 1  # sentinel entry = 255
    return lut[idx]


def _unknown_values(raw: np.ndarray, out: np.ndarray) -> dict[int, int]:
    """Raw non-zero values that mapped to ignore (not in the class table) -> their pixel counts."""
    sel = (out == IGNORE) & (raw != 0)
    if not sel.any():
        return {}
    values, counts = np.unique(raw[sel], return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts)}


def unknown_values_warning(summary: dict) -> str:
    """One warning line for the label values that are not in the dataset's class table (they were
    written as 255, ignore), with pixel and image counts per value; ``""`` when there are none."""
    images = summary.get("unknown_label_values") or {}
    if not images:
        return ""
    pixels = summary.get("unknown_label_pixels") or {}
    expected = {"ade20k": "0..150", "coco_stuff_10k": "0 and the coco_id column of classes.json"}
    parts = [f"{v} ({pixels.get(v, '?')} pixels in {n} image{'s' if n != 1 else ''})" for v, n in images.items()]
    return (f"warning: {summary.get('dataset')}: {len(images)} label value{'s' if len(images) != 1 else ''} not in "
            f"the class table ({expected.get(str(summary.get('dataset')), 'the class table')}) were set to "
            f"{IGNORE} (ignore): " + ", ".join(parts) + ". The official archive holds none: is this a modified "
            "copy?")


# ---------------------------------------------------------------------------- readers

def read_ade20k_label(path: Path) -> np.ndarray:
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise PrepareError(f"cannot read label {path} (missing or corrupt PNG)")
    if arr.ndim == 3:
        if arr.shape[2] >= 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]):
            arr = arr[..., 0]
        else:
            raise PrepareError(f"label {path} has {arr.shape[2]} colour channels; expected a single-channel "
                               "ADE20K class-index PNG")
    return arr


def read_coco_label(path: Path) -> np.ndarray:
    import scipy.io
    try:
        mat = scipy.io.loadmat(str(path), variable_names=["S"])
    except NotImplementedError as e:  # MATLAB v7.3 = HDF5: the v1.0 release
        raise PrepareError(f"label {path} is a MATLAB v7.3 (HDF5) file, the format of COCO-Stuff-10K v1.0; "
                           "use the v1.1 archive cocostuff-10k-v1.1.zip") from e
    except Exception as e:  # scipy raises several types for corrupt files
        raise PrepareError(f"cannot read label {path}: {e}") from e
    if "S" not in mat:
        raise PrepareError(f"label {path} has no variable 'S' (it holds: {_mat_variables(path)}); expected the "
                           "COCO-Stuff-10K v1.1 label map 'S'")
    s = np.asarray(mat["S"])
    if s.ndim != 2:
        raise PrepareError(f"label {path}: 'S' has shape {s.shape}; expected a 2-D label map")
    return s


def _mat_variables(path: Path) -> str:
    """The variables of a MATLAB file as ``name (HxW class)``, for messages."""
    import scipy.io
    try:
        found = scipy.io.whosmat(str(path))
    except Exception as e:  # noqa: BLE001 - only for a message
        return f"unreadable variable list: {e}"
    shown = [f"{name} ({'x'.join(map(str, shape))} {cls})" for name, shape, cls in found
             if not name.startswith("__")]
    return ", ".join(shown) if shown else "no variables"


# ---------------------------------------------------------------------------- one item (worker)

_LUTS: dict[str, np.ndarray] = {}


def _convert_chunk_job(job: tuple[dict[str, np.ndarray], list]) -> list[dict]:
    """A pool worker's share: OpenCV's own threads off (the pool's processes are the parallelism)."""
    luts, chunk = job
    cv2.setNumThreads(0)
    _LUTS.update(luts)
    return _convert_chunk(chunk)


def _convert_one(item: tuple[str, str, str, str, str]) -> dict:
    kind, image_src, label_src, image_dst_dir, label_dst = item
    image_src_p, label_src_p = Path(image_src), Path(label_src)
    if not image_src_p.is_file():
        raise PrepareError(f"image {image_src_p} is missing (its label is {label_src_p})")
    if not label_src_p.is_file():
        raise PrepareError(f"label {label_src_p} is missing for image {image_src_p}")
    raw = read_ade20k_label(label_src_p) if kind == "ade20k" else read_coco_label(label_src_p)
    try:
        out = apply_lut(raw, _LUTS[kind])
    except ValueError as e:
        raise PrepareError(f"label {label_src_p}: {e}") from e
    h, w = out.shape
    img = cv2.imread(image_src, cv2.IMREAD_COLOR)
    if img is None:
        raise PrepareError(f"cannot read image {image_src_p} (missing or corrupt)")
    stem = image_src_p.stem
    result = {"stem": stem, "unknown": _unknown_values(raw, out), "reoriented": False}
    if img.shape[:2] == (h, w):
        dst = Path(image_dst_dir) / (stem + image_src_p.suffix.lower())
        shutil.copyfile(image_src_p, dst)
    else:
        flat = cv2.imread(image_src, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if flat is None or flat.shape[:2] != (h, w):
            raise PrepareError(f"size mismatch: image {image_src_p} is {img.shape[1]}x{img.shape[0]} (WxH) but "
                               f"its label {label_src_p} is {w}x{h}")
        dst = Path(image_dst_dir) / (stem + ".png")
        if not cv2.imwrite(str(dst), flat):
            raise PrepareError(f"cannot write {dst}")
        result["reoriented"] = True
    if not cv2.imwrite(str(label_dst), out):
        raise PrepareError(f"cannot write label {label_dst}")
    return result


def _convert_chunk(items: list) -> list[dict]:
    return [_convert_one(it) for it in items]


# ---------------------------------------------------------------------------- listing

def find_dataset_root(dataset: str, folder: str | os.PathLike) -> Path:
    """The folder (``folder`` itself or up to two levels below) that holds the dataset tree."""
    folder = Path(folder)
    src = get_source(dataset)
    level = [folder]
    for depth in range(3):  # the folder itself, its children, its grandchildren
        for c in level:
            if all((c / m).exists() for m in src.root_markers):
                missing = [m for m in src.expected_members if not (c / m.rstrip("/")).exists()]
                if missing:
                    raise PrepareError(f"{dataset}: the extracted tree {c} lacks {', '.join(missing)} "
                                       f"(is this the official {src.archive_name}?)")
                return c
        if depth < 2:
            level = sorted(p for q in level if q.is_dir() for p in q.iterdir()
                           if p.is_dir() and p.name != "__MACOSX")
    top = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) if folder.is_dir() else "nothing"
    raise PrepareError(f"{dataset}: no dataset tree ({', '.join(src.root_markers)}) found in {folder} "
                       f"(it holds: {top}); is this the official {src.archive_name}?")


def _list_ade20k(root: Path, out: Path) -> list[tuple]:
    items = []
    for src_split, split in ADE20K_SPLITS.items():
        img_dir, ann_dir = root / "images" / src_split, root / "annotations" / src_split
        images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not images:
            raise PrepareError(f"ade20k: no images in {img_dir}")
        for p in images:
            items.append(("ade20k", str(p), str(ann_dir / (p.stem + ".png")),
                          str(out / "images_detectron2" / split),
                          str(out / "annotations_detectron2" / split / (p.stem + ".png"))))
    return items


def _read_list(path: Path) -> list[str]:
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name = line.strip()
        if not name:
            continue
        if name.lower().endswith(".jpg"):
            name = name[:-4]
        names.append(name)
    if len(set(names)) != len(names):
        raise PrepareError(f"{path} lists an image twice")
    return names


def _list_coco(root: Path, out: Path) -> list[tuple]:
    items = []
    for src_split, split in COCO_SPLITS.items():
        lst = root / "imageLists" / f"{src_split}.txt"
        names = _read_list(lst)
        if not names:
            raise PrepareError(f"coco_stuff_10k: {lst} lists no images")
        for name in names:
            items.append(("coco_stuff_10k", str(root / "images" / f"{name}.jpg"),
                          str(root / "annotations" / f"{name}.mat"),
                          str(out / "images_detectron2" / split),
                          str(out / "annotations_detectron2" / split / f"{name}.png")))
    return items


# ---------------------------------------------------------------------------- entry points

def prepare_dataset(dataset: str, src_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                    workers: int = 1, progress: bool = True) -> dict:
    """Prepare the extracted ``dataset`` found in ``src_dir`` into ``out_dir`` (replaced atomically).

    Returns ``{"dataset", "out_dir", "num_classes", "train", "test", "unknown_label_values",
    "unknown_label_pixels", "reoriented_images"}`` and writes it as ``<out_dir>/preparation.json``.
    ``unknown_label_values`` / ``unknown_label_pixels`` map each raw label value that is not
    in the class table (ADE20K above 150, COCO-Stuff ids without a ``coco_id`` row) to the
    number of images / pixels holding it; those pixels are written as 255 (ignore), and
    :func:`unknown_values_warning` words the warning the download stage prints.
    """
    if dataset not in ("ade20k", "coco_stuff_10k"):
        get_source(dataset)  # raises a clear error
    root = find_dataset_root(dataset, src_dir)
    classes = _class_table(dataset)
    luts = {"ade20k": ade20k_lut()} if dataset == "ade20k" else {"coco_stuff_10k": coco_lut(classes)}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        items = (_list_ade20k if dataset == "ade20k" else _list_coco)(root, tmp)
        for split in ("train", "test"):
            (tmp / "images_detectron2" / split).mkdir(parents=True, exist_ok=True)
            (tmp / "annotations_detectron2" / split).mkdir(parents=True, exist_ok=True)
        results = _run(items, luts, workers=workers, progress=progress, desc=f"prepare {dataset}")
        write_json(tmp / "classes.json", {
            "dataset": dataset,
            "classes": [{"id": int(c.get("id", i)), "name": c["name"], "isthing": int(c.get("isthing", 0)),
                         "color": [int(v) for v in c["color"]]} for i, c in enumerate(classes)],
        })
        summary = _summary(dataset, out_dir, classes, items, results)
        write_json(tmp / SUMMARY_FILE, summary)
    return summary


def _summary(dataset: str, out_dir: Path, classes: list, items: list, results: list[dict]) -> dict:
    images: dict[int, int] = {}
    pixels: dict[int, int] = {}
    for r in results:
        for v, n in r["unknown"].items():
            images[v] = images.get(v, 0) + 1
            pixels[v] = pixels.get(v, 0) + n
    counts = {s: sum(1 for it in items if Path(it[3]).name == s) for s in ("train", "test")}
    return {"dataset": dataset, "out_dir": str(out_dir), "num_classes": len(classes),
            "train": counts["train"], "test": counts["test"],
            "unknown_label_values": {str(v): images[v] for v in sorted(images)},
            "unknown_label_pixels": {str(v): pixels[v] for v in sorted(pixels)},
            "reoriented_images": sorted(r["stem"] for r in results if r["reoriented"])}


def _run(items: list, luts: dict, *, workers: int, progress: bool, desc: str) -> list[dict]:
    results: list[dict] = []
    with tqdm(total=len(items), desc=desc, unit="img", disable=not progress) as bar:
        if workers <= 1 or len(items) < 2:
            _LUTS.update(luts)  # in-process: leave this process's cv2 thread setting alone
            for it in items:
                results.append(_convert_one(it))
                bar.update(1)
            return results
        chunk = max(1, min(64, len(items) // (workers * 8) or 1))
        jobs = [(luts, items[i:i + chunk]) for i in range(0, len(items), chunk)]
        # the shared spawn pool (pipeline.jobs): results in order; the first PrepareError stops the rest
        for part in run_parallel(_convert_chunk_job, jobs, workers, lambda job, r: bar.update(len(job[1]))):
            results.extend(part)
    return results
