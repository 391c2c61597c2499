"""The embedded synthetic dataset: procedurally drawn scenes for weak-shot segmentation.

Each image is a background partitioned into 2-3 *stuff* regions (wavy bands or warped
Voronoi cells) with 1-5 *thing* objects (ellipses, rotated rectangles, triangles, irregular
polygons; 12%-45% of the image side) drawn on top in order, so that later objects occlude
earlier ones; the label map follows what is visible. 24 classes (10 stuff, 14 things).

Every class is a *colour pair + texture* (flat blotchy noise, stripes, waves, checkerboard,
dot lattice, grid, bricks, linear gradient, rings, pie sectors). Several classes share a hue
and differ only by texture (blue: sky / water / umbrella / balloon; red: brick wall / kite /
frisbee / drum; grey: gravel / tin can / robot; ...) and several share a texture and differ by
colour (stripes: grass / wooden floor / kite / tin can / traffic cone), so neither colour nor
texture alone separates the classes. Per instance: hue rotation, brightness and per-channel
colour jitter, texture angle / phase / period jitter; per image: an illumination gradient,
mild Gaussian blur and pixel noise.

Difficulty (measured with :func:`colour_baseline_accuracy`, seed 6, 320 train / 80 test,
128 x 128): a nearest-mean-colour per-pixel classifier fitted on train reaches
**49.7 %** pixel accuracy on test (always predicting the most frequent class: 11 %), so
colour alone is far from enough, while texture + colour make every class separable for a
small CNN. Every class occurs in 18%-29% of the train images (stuff ~8-10 % of all pixels
each, things ~1 % each). Generation: 400 images of 128 x 128 (files included) in 2.4-3.9 s
on one shared CPU core.

Splits (``SPLITS``): four fixed partitions of the 24 classes into quarters of 6 novel classes,
each mixing stuff and things; every class is novel in exactly one split.

Co-occurrence (``data.synthetic.cooccur``, 0..1; 0 by default). At 0 every class is drawn
independently of the others (today's data, bit-identical: no random number is drawn for the
setting) and every instance looks like its class. Then pixel-pair similarity has little to add
over image-level labels: a novel class seldom shares its images with one particular other
novel class, so the image labels alone tell them apart. In the real datasets classes come in
*scenes*: ADE20K's bed, pillow, lamp and wall, COCO-Stuff's person, surfboard, sea and sky
appear together, beside "other" / "unlabeled" stuff, and an image label "pillow" never comes
without "bed". With ``cooccur`` > 0, that share of the images is a *scene image*: one of the
three fixed scene groups (:data:`SCENES`, e.g. sky, grass, water, sand with beach ball,
cardboard box, kite, umbrella) supplies *all* its stuff and things, an unlabelled clutter
region and one or two clutter objects always join them, and every instance's two colours are
blended towards random clutter-like colours (by up to :data:`SCENE_COLOUR_MIX`), so colour
says less and texture must separate the classes. Each group holds exactly two novel classes
of every split and six base classes, so under any split the novel classes of a group co-occur
(image-level labels cannot separate them), and the base classes carry the same structure:
SimNet can learn "together but different" from base pairs. :func:`pair_cooccurrence` measures
it (Jaccard of the images holding each class of a pair).

Determinism: image ``i`` of split ``s`` is drawn from ``np.random.default_rng([seed, code(s), i])``,
so images depend on neither ``num_train`` nor ``num_test``, and the same seed writes
byte-identical files.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.config import SyntheticConfig
from pipeline.data import IGNORE
from pipeline.io import atomic_dir, write_json

# name, isthing, colour 1 (RGB), colour 2 (RGB), texture, period (pixels at 128 px), angle (deg)
_SPEC: list[tuple[str, int, tuple[int, int, int], tuple[int, int, int], str, float, float]] = [
    # ---- stuff (0..9)
    ("clear sky", 0, (120, 170, 228), (196, 220, 244), "gradient", 160.0, 90.0),
    ("grass", 0, (62, 138, 52), (112, 178, 72), "stripes", 4.5, 0.0),
    ("water", 0, (42, 92, 168), (92, 150, 208), "waves", 9.0, 90.0),
    ("sand", 0, (208, 180, 122), (178, 150, 96), "speckle", 3.0, 0.0),
    ("brick wall", 0, (164, 66, 46), (200, 190, 176), "bricks", 16.0, 0.0),
    ("snow field", 0, (226, 232, 240), (180, 198, 224), "noise", 24.0, 0.0),
    ("moss", 0, (76, 120, 56), (112, 152, 70), "noise", 10.0, 0.0),
    ("gravel", 0, (126, 124, 118), (84, 84, 80), "dots", 6.0, 30.0),
    ("carpet", 0, (122, 62, 132), (88, 40, 100), "checker", 6.0, 20.0),
    ("wooden floor", 0, (150, 100, 56), (112, 70, 40), "stripes", 12.0, 90.0),
    # ---- things (10..23)
    ("beach ball", 1, (234, 120, 40), (240, 230, 212), "sectors", 6.0, 0.0),
    ("cardboard box", 1, (170, 122, 72), (108, 74, 44), "grid", 14.0, 0.0),
    ("kite", 1, (196, 46, 50), (238, 200, 64), "stripes", 10.0, 45.0),
    ("umbrella", 1, (52, 82, 180), (122, 170, 228), "sectors", 8.0, 0.0),
    ("cushion", 1, (142, 72, 152), (200, 170, 212), "dots", 9.0, 0.0),
    ("glass bottle", 1, (52, 130, 72), (150, 208, 150), "gradient", 1.0, 90.0),
    ("lamp", 1, (234, 204, 82), (250, 240, 192), "rings", 10.0, 0.0),
    ("tin can", 1, (150, 150, 160), (202, 202, 212), "stripes", 7.0, 90.0),
    ("robot", 1, (110, 116, 132), (170, 176, 186), "checker", 12.0, 0.0),
    ("traffic cone", 1, (230, 100, 36), (236, 236, 236), "stripes", 16.0, 90.0),
    ("lemon crate", 1, (226, 200, 62), (160, 128, 60), "checker", 10.0, 45.0),
    ("frisbee", 1, (206, 56, 56), (150, 30, 36), "rings", 7.0, 0.0),
    ("drum", 1, (160, 80, 52), (222, 200, 160), "dots", 12.0, 0.0),
    ("balloon", 1, (70, 120, 214), (150, 186, 240), "noise", 40.0, 0.0),
]

CLASSES: list[dict[str, Any]] = [
    {"id": i, "name": name, "isthing": isthing, "color": list(c1)}
    for i, (name, isthing, c1, _c2, _tex, _p, _a) in enumerate(_SPEC)
]
NUM_CLASSES = len(CLASSES)
STUFF_IDS = [c["id"] for c in CLASSES if not c["isthing"]]
THING_IDS = [c["id"] for c in CLASSES if c["isthing"]]

# Four fixed weak-shot splits: 6 novel classes each (a quarter), every class novel once.
SPLITS: dict[int, list[int]] = {
    1: [1, 7, 12, 16, 20, 23],
    2: [2, 5, 9, 11, 14, 19],
    3: [0, 6, 10, 15, 18, 21],
    4: [3, 4, 8, 13, 17, 22],
}

# Scene groups of data.synthetic.cooccur: a scene image holds every class of one group. Each group has
# exactly two novel classes of every split of SPLITS (and six base ones), so a split's novel classes
# come in co-occurring pairs: (1, 12) (7, 16) (20, 23) for split 1, (2, 11) (5, 14) (9, 19) for split 2, ...
SCENES: tuple[dict[str, tuple[int, ...]], ...] = (
    {"stuff": (0, 1, 2, 3), "things": (10, 11, 12, 13)},        # sky, grass, water, sand; ball, box, kite, umbrella
    {"stuff": (4, 5, 6, 7), "things": (14, 15, 16, 17)},        # brick wall, snow, moss, gravel; cushion, bottle, ...
    {"stuff": (8, 9), "things": (18, 19, 20, 21, 22, 23)},      # carpet, wooden floor; robot, cone, crate, ...
)
SCENE_COLOUR_MIX = 0.6      # scene images: each instance's colours blended towards random ones by U(0, this)
SCENE_CLUTTER_OBJECTS = (1, 2)   # scene images: clutter objects (inclusive range), besides the clutter region

# per-class texture angle jitter (degrees, uniform +-); default 25
_ANGLE_JITTER = {1: 10.0, 0: 15.0, 9: 15.0, 19: 10.0, 17: 10.0}

SPLIT_CODES = {"train": 0, "test": 1}

# Unlabelled pixels (label 255 in train and test), as in the real data: a background region of
# clutter in CLUTTER_REGION_P of the images, and 0/1/2 clutter objects with these probabilities.
CLUTTER_REGION_P = 0.5
CLUTTER_OBJECTS_P = (0.3, 0.45, 0.25)
_CLUTTER_KINDS = ("stripes", "waves", "checker", "dots", "grid", "rings", "sectors", "noise")
# things per image (inclusive range): enough that many crops hold two or more novel classes
THINGS_PER_IMAGE = (2, 7)
JPEG_QUALITY = 95


# ----------------------------------------------------------------------------- textures
def _soft(s: np.ndarray, k: float) -> np.ndarray:
    """Map a wave in [-1, 1] to [0, 1] with edge sharpness ``k``."""
    return 0.5 + 0.5 * np.clip(s * k, -1.0, 1.0)


def _noise_field(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """Smooth random field in about [0, 1] with blobs of ``cell`` pixels."""
    g = max(2, int(round(size / max(cell, 1.0))) + 1)
    small = rng.random((g, g), dtype=np.float32)
    field = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / max(hi - lo, 1e-6)


def _texture(rng: np.random.Generator, kind: str, size: int, period: float, angle_deg: float,
             centre: tuple[float, float], xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Texture value t in [0, 1] over the whole frame (0 = colour 1, 1 = colour 2)."""
    theta = math.radians(angle_deg)
    ct, st = math.cos(theta), math.sin(theta)
    dx, dy = xx - centre[0], yy - centre[1]
    u = dx * ct + dy * st
    v = -dx * st + dy * ct
    two_pi = 2.0 * math.pi
    ph1, ph2 = rng.uniform(0, two_pi, 2)
    if kind == "stripes":
        return _soft(np.sin(u * (two_pi / period) + ph1), 2.5)
    if kind == "waves":
        amp, lam = 0.45 * period, rng.uniform(2.5, 4.0) * period
        return _soft(np.sin((u + amp * np.sin(v * (two_pi / lam) + ph2)) * (two_pi / period) + ph1), 1.6)
    if kind == "checker":
        return _soft(np.sin(u * (math.pi / period) + ph1) * np.sin(v * (math.pi / period) + ph2), 5.0)
    if kind == "dots":
        warp = (_noise_field(rng, size, 2.5 * period) - 0.5) * (0.6 * period)
        s = np.sin((u + warp) * (two_pi / period) + ph1) * np.sin((v - warp) * (two_pi / period) + ph2)
        return np.clip((s - 0.4) * 4.0, 0.0, 1.0)
    if kind == "grid":
        w = 0.22
        tu = np.clip((w - np.abs(np.sin(u * (math.pi / period) + ph1))) * (1.0 / w) * 1.5, 0.0, 1.0)
        tv = np.clip((w - np.abs(np.sin(v * (math.pi / period) + ph2))) * (1.0 / w) * 1.5, 0.0, 1.0)
        return np.maximum(tu, tv)
    if kind == "bricks":
        h = 0.5 * period
        vv = v + ph2 * h
        row = np.floor(vv / h)
        uu = u + ph1 * period + (row % 2) * (0.5 * period)
        col = np.floor(uu / period)
        mortar_w = max(1.0, 0.12 * h)
        a = uu - col * period
        b = vv - row * h
        mortar = ((a < mortar_w) | (b < mortar_w)).astype(np.float32)
        # per-brick shade variation (deterministic hash of the brick's row and column)
        hsh = np.sin(row * 12.9898 + col * 78.233 + ph1) * 43758.5453
        shade = (hsh - np.floor(hsh)) * 0.35
        return np.maximum(mortar, shade.astype(np.float32))
    if kind == "gradient":
        length = period
        return np.clip(0.5 + u / length + 0.15 * math.sin(ph1), 0.0, 1.0)
    if kind == "rings":
        r = np.sqrt(u * u + v * v)
        return _soft(np.sin(r * (two_pi / period) + ph1), 2.5)
    if kind == "sectors":
        n_half = int(round(period / 2))
        return _soft(np.sin(np.arctan2(v, u) * n_half + ph1), 6.0)
    if kind == "noise":
        f = _noise_field(rng, size, period)
        return np.clip((f - 0.5) * 1.6 + 0.5, 0.0, 1.0)
    if kind == "speckle":
        f = _noise_field(rng, size, 14.0 * size / 128.0)
        sp = rng.random((size, size), dtype=np.float32)
        return np.clip(0.35 * f + 0.65 * (sp > 0.6), 0.0, 1.0)
    raise ValueError(f"unknown texture kind {kind!r}")


def _hue_rotate(colours: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate RGB colours (N x 3) about the grey axis (a hue shift that keeps brightness)."""
    a = math.radians(degrees)
    k = np.full(3, 1.0 / math.sqrt(3.0))
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = np.eye(3) + math.sin(a) * kx + (1 - math.cos(a)) * (kx @ kx)
    return colours @ rot.T


def _render_class(rng: np.random.Generator, cid: int, size: int, centre: tuple[float, float],
                  extent: float, xx: np.ndarray, yy: np.ndarray, jitter: float = 1.0,
                  colour_mix: float = 0.0) -> np.ndarray:
    """Whole-frame RGB (float32, H x W x 3) of one instance of class ``cid``; ``jitter`` scales
    every per-instance variation (colour, brightness, texture period, angle, contrast);
    ``colour_mix`` > 0 blends the two colours towards random clutter-like ones by U(0, colour_mix)
    (scene images; 0 draws nothing for it)."""
    j = jitter
    _name, isthing, c1, c2, kind, period, angle = _SPEC[cid]
    scale = size / 128.0
    cols = np.array([c1, c2], dtype=np.float64)
    cols = _hue_rotate(cols, rng.normal(0.0, 10.0 * j))
    cols = cols * rng.uniform(1 - 0.25 * j, 1 + 0.25 * j) + rng.normal(0.0, 12.0 * j, (1, 3))
    cols = cols + rng.normal(0.0, 5.0 * j, (2, 3))
    if colour_mix > 0:
        m = rng.uniform(0.0, colour_mix)
        cols = (1.0 - m) * cols + m * rng.uniform(20.0, 235.0, (2, 3))
    if kind == "gradient" and isthing:
        p = period * extent * rng.uniform(1 - 0.2 * j, 1 + 0.25 * j)  # ramp across the object
    elif kind == "sectors":
        p = period  # number of wedges
    else:
        p = period * scale * rng.uniform(1 - 0.2 * j, 1 + 0.25 * j)
    ang = angle + j * rng.uniform(-_ANGLE_JITTER.get(cid, 25.0), _ANGLE_JITTER.get(cid, 25.0))
    t = _texture(rng, kind, size, p, ang, centre, xx, yy)
    contrast = rng.uniform(1.0 - 0.25 * j, 1.0)
    t = (t * contrast + (1.0 - contrast) * 0.5).astype(np.float32)
    c1v = cols[0].astype(np.float32)
    c2v = cols[1].astype(np.float32)
    return c1v[None, None, :] + t[:, :, None] * (c2v - c1v)[None, None, :]


# ----------------------------------------------------------------------------- layout
_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _GRID_CACHE:
        ax = np.arange(size, dtype=np.float32)
        _GRID_CACHE[size] = (np.broadcast_to(ax[None, :], (size, size)).copy(),
                             np.broadcast_to(ax[:, None], (size, size)).copy())
    return _GRID_CACHE[size]


def _stuff_layout(rng: np.random.Generator, size: int, n: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Partition the frame into ``n`` regions with irregular boundaries; returns region index."""
    warp_amp = rng.uniform(0.04, 0.12) * size
    wx = (_noise_field(rng, size, size / 3.0) - 0.5) * 2 * warp_amp
    wy = (_noise_field(rng, size, size / 3.0) - 0.5) * 2 * warp_amp
    if rng.random() < 0.5:
        # wavy bands roughly across the image
        theta = math.radians(rng.normal(90.0, 20.0))
        w = (xx + wx) * math.cos(theta) + (yy + wy) * math.sin(theta)
        lam = rng.uniform(0.4, 1.0) * size
        w = w + rng.uniform(0.02, 0.06) * size * np.sin((xx * math.sin(theta) - yy * math.cos(theta))
                                                         * (2 * math.pi / lam) + rng.uniform(0, 6.3))
        lo, hi = float(w.min()), float(w.max())
        fr = np.cumsum(rng.dirichlet(np.full(n, 4.0)))[:-1]
        cuts = lo + fr * (hi - lo)
        return np.searchsorted(cuts, w).astype(np.int64)
    # warped Voronoi cells: one or two seeds per region
    seeds, owner = [], []
    for r in range(n):
        for _ in range(1 + int(rng.random() < 0.3)):
            seeds.append(rng.uniform(0.05, 0.95, 2) * size)
            owner.append(r)
    px, py = xx + wx, yy + wy
    d = np.stack([(px - sx) ** 2 + (py - sy) ** 2 for sx, sy in seeds])
    region = np.asarray(owner)[np.argmin(d, axis=0)]
    # every region must be visible: if a seed lost everything, fall back to bands of the warp
    if len(np.unique(region)) < n:
        return _stuff_layout(rng, size, n, xx, yy)
    return region


def _thing_mask(rng: np.random.Generator, size: int) -> tuple[np.ndarray, tuple[float, float], float]:
    side = rng.uniform(0.12, 0.45) * size
    cx, cy = rng.uniform(0.1, 0.9, 2) * size
    mask = np.zeros((size, size), np.uint8)
    shape = rng.integers(0, 4)
    if shape == 0:  # ellipse
        a = side / 2
        b = a * rng.uniform(0.5, 1.0)
        cv2.ellipse(mask, (int(round(cx)), int(round(cy))), (max(1, int(round(a))), max(1, int(round(b)))),
                    float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif shape == 1:  # rotated rectangle
        w, h = side, side * rng.uniform(0.45, 1.0)
        pts = cv2.boxPoints(((float(cx), float(cy)), (float(w), float(h)), float(rng.uniform(0, 90))))
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    else:  # triangle (3 vertices) or irregular polygon (5-8 vertices)
        k = 3 if shape == 2 else int(rng.integers(5, 9))
        ang = np.sort(rng.uniform(0, 2 * math.pi, k)) if k > 3 else \
            rng.uniform(0, 2 * math.pi) + np.array([0, 2.1, 4.2]) + rng.normal(0, 0.25, 3)
        rad = side / 2 * (rng.uniform(0.6, 1.0, k) if k > 3 else np.ones(3))
        pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool), (float(cx), float(cy)), float(side)


def _render_clutter(rng: np.random.Generator, size: int, centre: tuple[float, float],
                    xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Whole-frame RGB of an *unlabelled* texture: random colours, texture kind, period and angle,
    so it is no class's colour pair + texture (ADE20K's "other", COCO-Stuff's "unlabeled")."""
    c1 = rng.uniform(20.0, 235.0, 3)
    c2 = np.clip(c1 + rng.normal(0.0, 60.0, 3), 0.0, 255.0)
    kind = _CLUTTER_KINDS[int(rng.integers(len(_CLUTTER_KINDS)))]
    period = rng.uniform(3.0, 24.0) * size / 128.0 if kind != "sectors" else float(rng.integers(3, 10) * 2)
    t = _texture(rng, kind, size, period, rng.uniform(0.0, 180.0), centre, xx, yy)
    t = t.astype(np.float32)
    return c1.astype(np.float32)[None, None, :] + t[:, :, None] * (c2 - c1).astype(np.float32)[None, None, :]


def generate_sample(rng: np.random.Generator, size: int, jitter: float = 1.0,
                    cooccur: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One image and its label: (RGB uint8 H x W x 3, label uint8 H x W, ids 0..23, 255 = unlabelled).
    ``jitter`` scales the nuisance variation: per instance (see :func:`_render_class`) and per
    image (illumination gradient, colour cast, pixel noise); 1 = the strongest. ``cooccur``: the
    probability that the image is a scene image (module docstring); 0 draws nothing for it, so
    the image is the one of before the setting existed."""
    xx, yy = _grid(size)
    rgb = np.zeros((size, size, 3), np.float32)
    label = np.zeros((size, size), np.uint8)

    scene = SCENES[int(rng.integers(len(SCENES)))] if cooccur > 0 and rng.random() < cooccur else None
    mix = SCENE_COLOUR_MIX if scene is not None else 0.0
    if scene is None:
        n_stuff = int(rng.choice([2, 3], p=[0.4, 0.6]))
        stuff = [int(c) for c in rng.choice(STUFF_IDS, n_stuff, replace=False)]
        if rng.random() < CLUTTER_REGION_P:          # one background region is unlabelled clutter
            stuff.append(IGNORE)
    else:                                            # the group's stuff and always a clutter region
        stuff = [int(c) for c in rng.permutation(scene["stuff"])] + [IGNORE]
    region = _stuff_layout(rng, size, len(stuff), xx, yy)
    for r, cid in enumerate(stuff):
        m = region == r
        centre = tuple(rng.uniform(0, size, 2))
        tex = (_render_clutter(rng, size, centre, xx, yy) if cid == IGNORE
               else _render_class(rng, cid, size, centre, float(size), xx, yy, jitter, mix))
        rgb[m] = tex[m]
        label[m] = cid

    if scene is None:
        n_things = int(rng.integers(THINGS_PER_IMAGE[0], THINGS_PER_IMAGE[1] + 1))
        things = [int(c) for c in rng.choice(THING_IDS, n_things, replace=False)]
        things += [IGNORE] * int(rng.choice(len(CLUTTER_OBJECTS_P), p=CLUTTER_OBJECTS_P))
    else:                                            # every thing of the group, beside clutter objects
        lo, hi = SCENE_CLUTTER_OBJECTS
        things = list(scene["things"]) + [IGNORE] * int(rng.integers(lo, hi + 1))
    order = rng.permutation(len(things))        # clutter objects occlude and are occluded like things
    for k in order:
        cid = things[k]
        m, centre, side = _thing_mask(rng, size)
        if not m.any():
            continue
        tex = (_render_clutter(rng, size, centre, xx, yy) if cid == IGNORE
               else _render_class(rng, cid, size, centre, side, xx, yy, jitter, mix))
        rgb[m] = tex[m]
        label[m] = cid

    # illumination gradient across the frame
    theta = rng.uniform(0, 2 * math.pi)
    ramp = ((xx - size / 2) * math.cos(theta) + (yy - size / 2) * math.sin(theta)) / size
    rgb *= (1.0 + rng.uniform(0.0, 0.3 * jitter) * ramp)[:, :, None]
    rgb *= rng.uniform(1 - 0.1 * jitter, 1 + 0.1 * jitter, 3).astype(np.float32)[None, None, :]  # colour cast
    sigma = rng.uniform(0.5, 0.9)
    rgb = cv2.GaussianBlur(rgb, (3, 3), sigma)
    rgb += rng.normal(0.0, rng.uniform(3.0, 8.0) * max(jitter, 0.25), rgb.shape).astype(np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), label


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Per-image generator, independent of the number of images generated."""
    return np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])


def pair_cooccurrence(labels, pairs) -> float:
    """How often the two classes of each pair share an image: per pair ``(a, b)`` the Jaccard index
    #images holding both / #images holding either (0 when neither occurs), averaged over
    ``pairs``. ``labels``: label maps (any shape). 1 = the image labels never tell a from b."""
    present = [set(np.unique(np.asarray(lab)).tolist()) for lab in labels]
    out = []
    for a, b in pairs:
        both = sum(a in s and b in s for s in present)
        either = sum(a in s or b in s for s in present)
        out.append(both / either if either else 0.0)
    return float(np.mean(out)) if out else float("nan")


def scene_novel_pairs(split: int) -> list[tuple[int, int]]:
    """The pairs of ``split``'s novel classes that share a scene group (:data:`SCENES`): the
    pairs that co-occur in every scene image of their group."""
    novel = set(SPLITS[split])
    out = []
    for g in SCENES:
        members = sorted(c for c in g["stuff"] + g["things"] if c in novel)
        out += [(a, b) for i, a in enumerate(members) for b in members[i + 1:]]
    return out


def describe_setting(cooccur: float) -> str:
    """One sentence on what ``data.synthetic.cooccur`` models (the report's data setting)."""
    if cooccur <= 0:
        return ("synthetic data with `data.synthetic.cooccur: 0`: classes occur independently of each other and every "
                "instance has its class's colours, so image-level labels already separate the novel classes and "
                "pixel-pair similarity has little to add (a setting where the paper's claim cannot show)")
    return (f"synthetic data with `data.synthetic.cooccur: {cooccur:g}`: {cooccur:.0%} of the images are scene images "
            "in which a fixed group of classes (two novel classes of every split, six base) co-occurs beside "
            "unlabelled clutter, with clutter-like colours (as bed, pillow and lamp in ADE20K), so image-level labels "
            "cannot separate the group's novel classes by themselves")


def stem(split: str, index: int) -> str:
    return f"syn_{split}_{index:06d}"


def generate_dataset(out_dir, cfg: SyntheticConfig, seed: int, progress: bool = True) -> dict:
    """Write the prepared dataset layout (see docs/ARCHITECTURE.md) into ``out_dir`` atomically.

    Returns a summary: image counts, per-class pixel frequencies (fraction of the labelled
    pixels of the split), per-class image frequencies (fraction of images containing the
    class) and the fraction of unlabelled (255) pixels per split.
    """
    out_dir = Path(out_dir)
    counts = {"train": int(cfg.num_train), "test": int(cfg.num_test)}
    size = int(cfg.image_size)
    pix = {s: np.zeros(NUM_CLASSES, np.int64) for s in counts}
    unlabelled = {s: 0 for s in counts}
    imgs = {s: np.zeros(NUM_CLASSES, np.int64) for s in counts}
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    with atomic_dir(out_dir) as tmp:
        bar = tqdm(total=sum(counts.values()), desc="synthetic", unit="img", disable=not progress)
        for split, n in counts.items():
            img_dir = tmp / "images_detectron2" / split
            ann_dir = tmp / "annotations_detectron2" / split
            img_dir.mkdir(parents=True)
            ann_dir.mkdir(parents=True)
            for i in range(n):
                rgb, label = generate_sample(sample_rng(seed, split, i), size, float(cfg.jitter), float(cfg.cooccur))
                name = stem(split, i)
                if not cv2.imwrite(str(img_dir / f"{name}.jpg"), np.ascontiguousarray(rgb[:, :, ::-1]), params):
                    raise OSError(f"could not write {img_dir / (name + '.jpg')}")
                if not cv2.imwrite(str(ann_dir / f"{name}.png"), label):
                    raise OSError(f"could not write {ann_dir / (name + '.png')}")
                hist = np.bincount(label.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]
                pix[split] += hist
                unlabelled[split] += int((label == IGNORE).sum())
                imgs[split] += hist > 0
                bar.update(1)
        bar.close()
        write_json(tmp / "classes.json", {"dataset": "synthetic", "classes": CLASSES})
    return {
        "dataset": "synthetic",
        "seed": int(seed),
        "image_size": size,
        "num_images": counts,
        "num_classes": NUM_CLASSES,
        "class_pixel_frequency": {s: (pix[s] / max(1, pix[s].sum())).round(6).tolist() for s in counts},
        "class_image_frequency": {s: (imgs[s] / max(1, counts[s])).round(6).tolist() for s in counts},
        "unlabelled_fraction": {s: round(unlabelled[s] / max(1, counts[s] * size * size), 6) for s in counts},
    }
