"""Run a trained model on any images: label maps, colour overlays with a legend, class shares.

The model is the train stage's checkpoint (``data/train/model.pt``: weights, params, split),
given as a file or as an MLflow reference (``runs:/<run_id>/<path>``, a bare run id,
``models:/<name>/<version>`` or ``models:/<name>@<alias>``, e.g. ``@champion``) that :func:`resolve_model` downloads and searches for a file
that loads as such a checkpoint (any depth, so a raw ``model.pt`` artifact and an MLflow
model folder holding it both work).

Inference is the evaluation's semantic inference (:func:`pipeline.model.semantic_inference`):
each image is resized like the test images of the model's params (``data.test_short_edge`` /
``data.test_max_edge``, or the values given; when the params set no cap, the long edge is capped
at the training scale ``data.crop_size x data.scale_max``, :func:`training_max_edge`: an
8000 x 6000 photo at full size took 12.9 GB and 336 s, capped 1.7 GB and 46 s:
reports/predict_memory.json), padded with zeros to a multiple of 32 and run
through the model; the class scores are resampled bilinearly to the original image size
(in strips of rows, so a large photo never holds a K x H x W map at once) and each pixel
takes the class with the highest score, or 255 where that score is below ``min_score``
(0 by default: every pixel gets a class). Images of any sizes are batched: images whose padded
sizes agree run together, each padded to that size and its result cropped back, which gives
the same labels as running it alone.

Per image ``<name>`` the outputs are ``<name>_label.png`` (uint8 class ids, 255 = none),
``<name>_overlay.png`` (the image with the classes blended in, and a legend panel on the
right listing the classes present by share, with their colour) and ``<name>_shares.csv``
(``class_id, name, pixels, share``); ``summary.csv`` has one row per input. ``<name>`` is
the file's stem, made unique with ``-2``, ``-3``, ... when two inputs share one. Every file is
written under a temporary name and renamed.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .data import IGNORE
from .data.dataset import resize_for_test, test_size
from .io import atomic_path, write_bytes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SIZE_DIVISOR = 32
SUMMARY_NAME = "summary.csv"
SHARES_COLUMNS = ("class_id", "name", "pixels", "share")
SUMMARY_COLUMNS = ("image", "output", "width", "height", "status", "classes", "top_class", "top_share",
                   "none_share", "error")
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_STRIP_VALUES = 1 << 24  # floats per resampling strip (64 MiB)


class PredictError(RuntimeError):
    """The model reference, an option or the output folder is unusable."""


# ----------------------------------------------------------------------------- the model

def is_checkpoint(obj) -> bool:
    """True for a dict written by the train stage's ``export_model``."""
    return isinstance(obj, dict) and {"model", "params", "num_classes"} <= set(obj)


def is_mlflow_reference(ref: str) -> bool:
    return ref.startswith(("runs:/", "models:/")) or bool(_RUN_ID.fullmatch(ref))


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else this repository's store (as the stages use it)."""
    from . import repo, tracking
    return tracking.tracking_uri(repo.store_root())


def find_checkpoint(folder: str | os.PathLike) -> Path:
    """The first file under ``folder`` (``model.pt`` files first, then shallow before deep)
    that loads as a train-stage checkpoint."""
    from .engine.checkpoint import load_checkpoint
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file()]
    candidates = sorted((p for p in files if p.suffix.lower() in (".pt", ".pth", ".ckpt")),
                        key=lambda p: (p.name != "model.pt", len(p.relative_to(folder).parts), str(p)))
    for p in candidates:
        try:
            if is_checkpoint(load_checkpoint(p)):
                return p
        except ValueError:
            continue
    shown = ", ".join(str(p.relative_to(folder)) for p in sorted(files)[:12]) or "nothing"
    raise PredictError(f"no trained-model checkpoint (a .pt file with 'model', 'params', 'num_classes') in "
                       f"{folder}; it holds: {shown}")


def resolve_model(ref: str, download_dir: str | os.PathLike, tracking_uri: str | None = None) -> Path:
    """A checkpoint file from ``ref``: a file path, a folder holding one, or an MLflow reference
    (``runs:/<run_id>/<path>``, ``<run_id>``, ``models:/<name>/<version>``, ``models:/<name>@<alias>``) downloaded into
    ``download_dir`` from ``tracking_uri`` (default :func:`default_tracking_uri`)."""
    path = Path(ref)
    if path.is_file():
        return path
    if path.is_dir():
        return find_checkpoint(path)
    if not is_mlflow_reference(ref):
        raise PredictError(f"model {ref!r}: no such file or folder, and not an MLflow reference "
                           "(runs:/<run_id>/<path>, a 32-hex-digit run id, models:/<name>/<version> or "
                           "models:/<name>@<alias>)")
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    uri = tracking_uri or default_tracking_uri()
    attempts = [dict(artifact_uri=ref)] if not _RUN_ID.fullmatch(ref) else \
        [dict(run_id=ref, artifact_path=""), dict(artifact_uri=f"runs:/{ref}/model")]
    errors = []
    for i, kwargs in enumerate(attempts):
        dst = Path(download_dir).absolute() / f"mlflow-{i}"
        dst.mkdir(parents=True, exist_ok=True)
        try:
            with _registry(uri), _store_dir(uri):
                got = Path(mlflow.artifacts.download_artifacts(dst_path=str(dst), tracking_uri=uri, **kwargs))
        except (MlflowException, OSError) as e:
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
            continue
        try:
            return got if got.is_file() and _loads_as_checkpoint(got) else find_checkpoint(got)
        except PredictError as e:
            errors.append(str(e))
    raise PredictError(f"model {ref!r} from the MLflow store {uri}: " + "; ".join(errors))


@contextlib.contextmanager
def _registry(uri: str):
    """``models:/`` references are resolved through the model registry, whose URI MLflow takes from
    the process (``$MLFLOW_REGISTRY_URI``, else the global tracking URI, else ``sqlite:///mlflow.db``
    in the working directory), not from ``download_artifacts(tracking_uri=...)``: point it at ``uri``
    for the download, then restore it."""
    import mlflow
    before = os.environ.get("MLFLOW_REGISTRY_URI")
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_registry_uri(before)
        if before is None:
            os.environ.pop("MLFLOW_REGISTRY_URI", None)


def _store_dir(uri: str):
    """The embedded store's folder as the working directory: its artifact locations are relative to
    the repository root (``mlartifacts/<experiment>``, pipeline.tracking), and MLflow resolves them
    from the working directory. A server needs nothing."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if folder.is_dir():
            return contextlib.chdir(folder)
    return contextlib.nullcontext()


def _loads_as_checkpoint(path: Path) -> bool:
    from .engine.checkpoint import load_checkpoint
    try:
        return is_checkpoint(load_checkpoint(path))
    except ValueError:
        return False


@dataclass
class Predictor:
    model: torch.nn.Module
    device: torch.device
    class_names: list[str]
    colors: np.ndarray              # K x 3 uint8 RGB
    short_edge: int = 0
    max_edge: int = 0
    source: str = ""
    novel: list[int] = field(default_factory=list)
    max_edge_from: str = ""         # where max_edge comes from (said by tools.predict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def palette(num_classes: int) -> np.ndarray:
    """K distinct-looking RGB colours (golden-ratio hues), for class tables without colours."""
    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0
    hsv = np.stack([hues * 179, np.full(num_classes, 200), np.where(np.arange(num_classes) % 2, 230, 170)], -1)
    return cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0]


def class_table_for(num_classes: int, dataset: str, names: Sequence[str] | None,
                    classes_json: str | os.PathLike | None = None) -> tuple[list[str], np.ndarray]:
    """Class names and colours: from ``classes_json`` (a prepared dataset's ``classes.json`` or its
    folder) when given, else the dataset's shipped table when it matches the checkpoint's class
    names, else the checkpoint's names with a generated palette."""
    if classes_json is not None:
        from .data.catalog import load_class_table
        p = Path(classes_json)
        table = load_class_table(p if p.is_dir() else p.parent) if p.name == "classes.json" or p.is_dir() else None
        if table is None:
            raise PredictError(f"--classes {p}: expected a classes.json file or the folder holding it")
        if len(table) != num_classes:
            raise PredictError(f"class table {p} has {len(table)} classes but the model predicts {num_classes}")
        cols = [c.get("color") for c in table]
        colors = np.array(cols, np.uint8) if all(isinstance(c, list) and len(c) == 3 for c in cols) \
            else palette(num_classes)
        return [str(c["name"]) for c in table], colors
    names = [str(n) for n in names] if names else [f"class {i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise PredictError(f"the checkpoint names {len(names)} classes but its model predicts {num_classes}")
    try:
        from .data.catalog import class_table
        table = class_table(dataset)
        if [c["name"] for c in table] == names and all(len(c.get("color", ())) == 3 for c in table):
            return names, np.array([c["color"] for c in table], np.uint8)
    except (ValueError, KeyError):
        pass
    return names, palette(num_classes)


def training_max_edge(p) -> int:
    """The longest image edge a model of params ``p`` saw in training: its crops come from images
    whose short edge was resized to at most ``data.crop_size x data.scale_max``. Predict caps the
    long edge there by default (:func:`load_predictor`): objects appear at the scale the model
    learned, and memory and time stay bounded whatever the photo's size."""
    return max(SIZE_DIVISOR, round(p.data.crop_size * p.data.scale_max))


def load_predictor(path: str | os.PathLike, device: torch.device, *, classes_json=None,
                   short_edge: int | None = None, max_edge: int | None = None) -> Predictor:
    """Rebuild the model of a train-stage checkpoint on ``device``. Test-time resizing defaults to
    the checkpoint's ``data.test_short_edge`` / ``data.test_max_edge``; when the params set no cap
    (``test_max_edge: 0``) the long edge is capped at :func:`training_max_edge`. ``max_edge=0``
    runs at full size (memory grows with the pixels: reports/predict_memory.json)."""
    from .config import build_params
    from .engine.checkpoint import load_checkpoint
    from .model import build_model
    ck = load_checkpoint(path)
    if not is_checkpoint(ck):
        raise PredictError(f"{path} is not a trained-model checkpoint (expected the train stage's model.pt "
                           "with 'model', 'params' and 'num_classes')")
    p = build_params(ck["params"])
    k = int(ck["num_classes"])
    model = build_model(p.model, k)
    model.load_state_dict(ck["model"])
    split = ck.get("split") or {}
    names, colors = class_table_for(k, str(split.get("dataset", p.data.dataset)), split.get("class_names"),
                                    classes_json)
    se = p.data.test_short_edge if short_edge is None else int(short_edge)
    if max_edge is not None:
        me, where = int(max_edge), "--max-edge"
    elif p.data.test_max_edge:
        me, where = p.data.test_max_edge, "the model's data.test_max_edge"
    else:
        me = training_max_edge(p)
        where = (f"the model's training scale (data.crop_size {p.data.crop_size} x data.scale_max "
                 f"{p.data.scale_max:g}; its data.test_max_edge is 0)")
    if se < 0 or me < 0:
        raise PredictError("short and max edge must be >= 0 (0 keeps the image size)")
    return Predictor(model.to(device).eval(), device, names, colors, se, me, str(path),
                     [int(c) for c in split.get("novel", [])], where)


# ----------------------------------------------------------------------------- inputs

def collect_images(inputs: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files given as they are (whatever their suffix) and folders searched recursively for
    image suffixes (hidden entries skipped), in order, each once.
    Returns ``(paths, problems)`` with ``(input, message)`` for inputs that do not exist."""
    paths: list[Path] = []
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES
                           and not any(part.startswith(".") for part in q.relative_to(p).parts))
            if not found:
                problems.append((str(p), f"folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)})"))
        elif p.is_file():
            found = [p]
        else:
            problems.append((str(p), f"{p} does not exist"))
            found = []
        for q in found:
            key = q.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(q)
    return paths, problems


def output_names(paths: Sequence[Path]) -> list[str]:
    """Each path's stem, made unique with ``-2``, ``-3``, ... (in order)."""
    used: set[str] = set()
    names = []
    for p in paths:
        base = p.stem or "image"
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}-{n}"
        used.add(name)
        names.append(name)
    return names


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 H x W x 3 (EXIF orientation applied, as image viewers show it)."""
    try:
        data = np.fromfile(str(path), np.uint8)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise ValueError(f"cannot read {path}: not an image file OpenCV can decode "
                         f"({'empty file' if not data.size else 'unknown or corrupt format'})")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)       # in place: one copy of a big photo


# ----------------------------------------------------------------------------- inference

def _resample_labels(scores: torch.Tensor, valid: tuple[int, int], padded: tuple[int, int],
                     out: tuple[int, int], min_score: float) -> np.ndarray:
    """K x h4 x w4 scores of a padded input -> uint8 labels of size ``out``.

    Bilinear (``align_corners=False``) from the region of the padded input holding the image
    (``valid`` of ``padded`` pixels), in strips of output rows, then argmax / threshold.
    """
    from .engine.evaluate import resample_scores
    k = scores.shape[0]
    oh, ow = out
    rows = max(1, _STRIP_VALUES // max(1, k * ow))
    label = np.empty((oh, ow), np.uint8)
    for r0 in range(0, oh, rows):
        r1 = min(oh, r0 + rows)
        s = resample_scores(scores, valid, padded, out, slice(r0, r1))
        best, arg = s.max(0)
        lab = arg.to(torch.uint8) if k <= IGNORE else arg.clamp(max=IGNORE - 1).to(torch.uint8)
        lab[~(best >= min_score)] = IGNORE  # also NaN scores
        label[r0:r1] = lab.cpu().numpy()
    return label


@torch.no_grad()
def predict_arrays(predictor: Predictor, images: Sequence[np.ndarray], min_score: float = 0.0) -> list[np.ndarray]:
    """Labels (uint8, image size) for RGB images that share one padded size after resizing."""
    if not images:
        return []
    sizes = [test_size(im.shape[0], im.shape[1], predictor.short_edge, predictor.max_edge) for im in images]
    ph = max(math.ceil(h / SIZE_DIVISOR) * SIZE_DIVISOR for h, _ in sizes)
    pw = max(math.ceil(w / SIZE_DIVISOR) * SIZE_DIVISOR for _, w in sizes)
    x = torch.zeros((len(images), 3, ph, pw), dtype=torch.float32)
    for i, (im, (h, w)) in enumerate(zip(images, sizes)):
        im = resize_for_test(im, predictor.short_edge, predictor.max_edge)
        x[i, :, :h, :w] = torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1)))
    out = predictor.model(x.to(predictor.device))
    from .model import semantic_inference
    scores = semantic_inference(out["pred_logits"], out["pred_masks"])
    return [_resample_labels(scores[i], sizes[i], (ph, pw), im.shape[:2], min_score)
            for i, im in enumerate(images)]


def padded_key(predictor: Predictor, shape: tuple[int, ...]) -> tuple[int, int]:
    h, w = test_size(shape[0], shape[1], predictor.short_edge, predictor.max_edge)
    return math.ceil(h / SIZE_DIVISOR) * SIZE_DIVISOR, math.ceil(w / SIZE_DIVISOR) * SIZE_DIVISOR


# ----------------------------------------------------------------------------- outputs

def class_shares(label: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """Pixels and share of every class present (largest first, ties by id), then 255 ("none")."""
    counts = np.bincount(label.ravel(), minlength=256)
    total = max(1, int(label.size))
    ids = sorted((int(c) for c in np.flatnonzero(counts) if c != IGNORE), key=lambda c: (-counts[c], c))
    if counts[IGNORE]:
        ids.append(IGNORE)
    rows = [{"class_id": c, "name": "none" if c == IGNORE else (class_names[c] if c < len(class_names) else str(c)),
             "pixels": int(counts[c]), "share": counts[c] / total} for c in ids]
    return pd.DataFrame(rows, columns=list(SHARES_COLUMNS))


@dataclass
class LegendEntry:
    class_id: int
    name: str
    share: float
    color: tuple[int, int, int]     # RGB
    box: tuple[int, int, int, int]  # swatch x0, y0, x1, y1 (inclusive) in the overlay


def overlay_with_legend(image: np.ndarray, label: np.ndarray, class_names: Sequence[str], colors: np.ndarray,
                        alpha: float = 0.5) -> tuple[np.ndarray, list[LegendEntry]]:
    """RGB canvas: the image with each class's colour blended in (``alpha``; 255 left as is) and,
    on its right, a white legend panel with one swatch per class present (largest share first)
    and its ``id name share%``. Returns the canvas and the legend entries."""
    h, w = label.shape
    colors = np.asarray(colors, np.uint8).reshape(-1, 3)

    shares = class_shares(label, class_names)
    scale = max(1.0, min(h, w) / 400.0)
    font, fscale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.45 * scale, max(1, round(scale))
    row, sw, pad = round(20 * scale), round(14 * scale), round(6 * scale)
    texts = []
    for r in shares.itertuples(index=False):
        name = str(r.name).encode("ascii", "replace").decode("ascii")
        ident = "255" if r.class_id == IGNORE else str(r.class_id)
        texts.append(f"{ident} {name} {100 * r.share:.1f}%")
    widths = [cv2.getTextSize(t, font, fscale, thick)[0][0] for t in texts] or [0]
    panel_w = pad * 3 + sw + max(widths)
    panel_h = pad * 2 + row * len(texts)
    canvas = np.full((max(h, panel_h), w + panel_w, 3), 255, np.uint8)
    rows = max(1, _STRIP_VALUES // max(1, 3 * w))          # blended in strips: no float copy of a big photo
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)                               # the canvas may be taller (legend)
        over = image[r0:r1].astype(np.float32)
        lab = label[r0:r1]
        known = (lab != IGNORE) & (lab < len(colors))
        over[known] = (1 - alpha) * over[known] + alpha * colors[lab[known]].astype(np.float32)
        canvas[r0:r1, :w] = np.clip(np.rint(over), 0, 255).astype(np.uint8)
    entries: list[LegendEntry] = []
    for i, (r, t) in enumerate(zip(shares.itertuples(index=False), texts)):
        y0 = pad + i * row + (row - sw) // 2
        x0 = w + pad
        if r.class_id != IGNORE:
            col = tuple(int(v) for v in colors[r.class_id]) if r.class_id < len(colors) else (0, 0, 0)
            canvas[y0:y0 + sw, x0:x0 + sw] = col
        else:
            col = (255, 255, 255)
            cv2.rectangle(canvas, (x0, y0), (x0 + sw - 1, y0 + sw - 1), (128, 128, 128), 1)
        entries.append(LegendEntry(int(r.class_id), str(r.name), float(r.share), col,
                                   (x0, y0, x0 + sw - 1, y0 + sw - 1)))
        baseline = pad + i * row + (row + cv2.getTextSize(t, font, fscale, thick)[0][1]) // 2
        cv2.putText(canvas, t, (x0 + sw + pad, baseline), font, fscale, (0, 0, 0), thick, cv2.LINE_AA)
    return canvas, entries


def _encode_png(arr: np.ndarray, what: Path) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise OSError(f"cannot encode {what} as PNG")
    return buf.tobytes()


def write_outputs(out_dir: Path, name: str, image: np.ndarray, label: np.ndarray, predictor: Predictor,
                  alpha: float = 0.5) -> dict:
    """Write the three per-image files atomically; return the image's summary fields."""
    write_bytes(out_dir / f"{name}_label.png", _encode_png(label, out_dir / f"{name}_label.png"))
    canvas, _ = overlay_with_legend(image, label, predictor.class_names, predictor.colors, alpha)
    write_bytes(out_dir / f"{name}_overlay.png",
                _encode_png(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR), out_dir / f"{name}_overlay.png"))
    shares = class_shares(label, predictor.class_names)
    with atomic_path(out_dir / f"{name}_shares.csv") as tmp:
        shares.to_csv(tmp, index=False)
    present = shares[shares["class_id"] != IGNORE]
    none = shares.loc[shares["class_id"] == IGNORE, "share"]
    return {"classes": " ".join(str(int(c)) for c in present["class_id"]),
            "top_class": str(present["name"].iloc[0]) if len(present) else "",
            "top_share": float(present["share"].iloc[0]) if len(present) else 0.0,
            "none_share": float(none.iloc[0]) if len(none) else 0.0}


# ----------------------------------------------------------------------------- driver

def predict_images(predictor: Predictor, paths: Sequence[Path], out_dir: str | os.PathLike, *,
                   batch_size: int = 4, min_score: float = 0.0, alpha: float = 0.5, progress: bool = True,
                   on_error: Callable[[Path, str], None] | None = None) -> pd.DataFrame:
    """Predict every image of ``paths`` into ``out_dir``; return the summary (also ``summary.csv``).

    Images are read one at a time and buffered per padded size; a size's batch runs when it
    holds ``batch_size`` images (or when ``4 * batch_size`` images wait in all, the largest
    group first), and what is left runs at the end. An image that cannot be read or
    predicted gets ``status`` "error" and its ``error`` message (``on_error(path, message)`` is
    called at once); the others go on.
    """
    if batch_size < 1:
        raise PredictError(f"batch size {batch_size}: expected >= 1")
    if not 0.0 <= alpha <= 1.0:
        raise PredictError(f"alpha {alpha}: expected 0..1")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PredictError(f"cannot create the output folder {out_dir}: {e.strerror or e}") from None
    if not os.access(out_dir, os.W_OK):
        raise PredictError(f"the output folder {out_dir} is not writable")
    names = output_names(paths)
    rows: dict[int, dict] = {}
    pending: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}

    def fail(i: int, message: str) -> None:
        rows[i] = {"status": "error", "error": message}
        if on_error is not None:
            on_error(paths[i], message)
        bar.update(1)

    def run(key: tuple[int, int]) -> None:
        group = pending.pop(key)
        try:
            labels = predict_arrays(predictor, [im for _, im in group], min_score)
        except (RuntimeError, ValueError) as e:  # e.g. out of memory for one huge size
            for i, _ in group:
                fail(i, f"prediction failed for {paths[i]}: {str(e).splitlines()[0]}")
            return
        for (i, im), lab in zip(group, labels):
            try:
                rows[i] = {"status": "ok", "error": "", "width": im.shape[1], "height": im.shape[0],
                           **write_outputs(out_dir, names[i], im, lab, predictor, alpha)}
            except OSError as e:
                fail(i, f"cannot write the outputs of {paths[i]} into {out_dir}: {e}")
                continue
            bar.update(1)

    with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for i, path in enumerate(paths):
            try:
                im = read_image(path)
            except ValueError as e:
                fail(i, str(e))
                continue
            key = padded_key(predictor, im.shape)
            pending.setdefault(key, []).append((i, im))
            if len(pending[key]) >= batch_size:
                run(key)
            elif sum(len(g) for g in pending.values()) >= 4 * batch_size:
                run(max(pending, key=lambda k: len(pending[k])))
        for key in list(pending):
            run(key)

    records = []
    for i, path in enumerate(paths):
        r = rows.get(i, {"status": "error", "error": "not processed"})
        records.append({"image": str(path), "output": names[i], **r})
    summary = pd.DataFrame(records).reindex(columns=list(SUMMARY_COLUMNS))
    for c in ("width", "height"):
        summary[c] = summary[c].astype("Int64")
    with atomic_path(out_dir / SUMMARY_NAME) as tmp:
        summary.to_csv(tmp, index=False)
    return summary


def model_download_dir() -> tempfile.TemporaryDirectory:
    """A temporary folder for MLflow downloads (removed when closed)."""
    return tempfile.TemporaryDirectory(prefix="simformer-predict-")
