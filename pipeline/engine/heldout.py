"""Held-out similarity diagnostics: after training, how well each pixel-pair scorer ranks a fixed
set of *test* pixel pairs by "same class" (ground truth used only to measure).

The single-batch AUCs logged during training (:func:`pipeline.engine.diagnostics.novel_pair_auc`)
see 4 image pairs of one training batch; these see :data:`HELDOUT_PAIRS` pairs of the test split,
the same pairs for every variant and seed (:data:`HELDOUT_SEED`, drawn from the test label maps
only), so variants can be compared pair for pair.

Pairs (:func:`sample_heldout_pairs`) are drawn at mask-feature resolution (stride 4 of the
padded test-time input), half within one test image and half across two, in five pools of
equal size: same base class / two base classes / same novel class / two novel classes / a novel
pixel with an *unlabelled* one (label 255 inside the image: ADE20K's "other", COCO-Stuff's
"unlabeled", the synthetic clutter). Three AUCs per scorer (:data:`KINDS`):

* ``base``: same base class against two base classes (what SimLoss trains SimNet on);
* ``novel``: same novel class against two novel classes (what DistLoss needs SimNet to know);
* ``novel_unlabelled``: same novel class against novel-with-unlabelled (telling a novel class
  from the clutter beside it).

Scorers (:data:`SCORERS`): ``simnet`` - SimNet's similarity (eval mode), the teacher of DistLoss;
``student`` - ReLU(cos) of the novel score vectors ``s(x)``, DistLoss's student; ``feature`` - the
plain cosine of the ``mask_features`` SimNet reads (what the features already group without
SimNet). DistLoss can teach the student only where SimNet's AUC exceeds the student's.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..data import IGNORE
from ..data.dataset import read_image, read_label, resize_for_test, test_size
from ..losses.similarity import downsample_labels, novel_score_map
from .diagnostics import pair_auc

HELDOUT_SEED = 2022             # one fixed draw of pairs for every variant and seed
HELDOUT_PAIRS = 100_000         # pixel pairs scored (five pools of equal size)
KINDS = ("base", "novel", "novel_unlabelled")
SCORERS = ("simnet", "student", "feature")
POOLS = ("base_same", "base_diff", "novel_same", "novel_diff", "novel_unlabelled")
STRIDE = 4                      # mask features: stride 4 of the input
SIZE_DIVISOR = 32               # the input is zero-padded to a multiple of this (as evaluation does)
PIXELS_PER_IMAGE = 4096         # at most this many pixels per image take part (large real images)
BATCH = 16                      # test images per forward pass


def metric_key(scorer: str, kind: str) -> str:
    """``heldout_auc_<scorer>_<kind>``: the name in metrics, cell.json, MLflow and the report."""
    return f"heldout_auc_{scorer}_{kind}"


METRIC_KEYS = tuple(metric_key(s, k) for s in SCORERS for k in KINDS)


def _padded(h: int, w: int) -> tuple[int, int]:
    return h + (-h % SIZE_DIVISOR), w + (-w % SIZE_DIVISOR)


def feature_labels(label: np.ndarray, short_edge: int = 0, max_edge: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A test label map (``H x W``) at the mask-feature resolution of its model input (resized to its
    test size, zero-padded to a multiple of 32, stride 4): ``(labels, inside)``, ``inside`` False on
    the padding (whose label is 255 too, but it is no unlabelled pixel)."""
    h, w = label.shape
    th, tw = test_size(h, w, short_edge, max_edge)
    lab = torch.from_numpy(np.ascontiguousarray(label)).long()
    if (th, tw) != (h, w):
        lab = F.interpolate(lab[None, None].float(), size=(th, tw), mode="nearest")[0, 0].long()
    ph, pw = _padded(th, tw)
    full = torch.full((ph, pw), IGNORE, dtype=torch.long)
    full[:th, :tw] = lab
    inside = torch.zeros((ph, pw), dtype=torch.bool)
    inside[:th, :tw] = True
    size = (ph // STRIDE, pw // STRIDE)
    fl = downsample_labels(full, size)
    fi = F.interpolate(inside[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
    return fl.numpy(), fi.numpy()


def _draw(rng: np.random.Generator, n: int, first: np.ndarray, second: np.ndarray, img: np.ndarray,
          lab: np.ndarray, same: bool | None, within: bool, rounds: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pixel pairs ``(i, j)`` (global pixel ids): ``i`` uniform over ``first``, ``j`` uniform over
    the ``second`` pixels that satisfy the pair's rule - in ``i``'s image (``within``) or in another
    one, of ``i``'s class (``same`` True), of another class (False) or either (None), never ``i``
    itself. A pair that finds no partner is drawn again, both ends, up to ``rounds`` times, then
    dropped; fewer than ``n`` come back only then."""
    if n <= 0 or first.size == 0 or second.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    k = int(lab.max()) + 1

    def key(ids):
        if within:
            return img[ids].astype(np.int64) * k + lab[ids] if same else img[ids].astype(np.int64)
        return lab[ids].astype(np.int64) if same else np.zeros(ids.size, np.int64)

    order = np.argsort(key(second), kind="stable")
    sorted_second = second[order]
    uniq, start, count = np.unique(key(sorted_second), return_index=True, return_counts=True)
    i = np.full(n, -1, np.int64)
    j = np.full(n, -1, np.int64)
    for _ in range(rounds):
        todo = np.flatnonzero(j < 0)
        if todo.size == 0:
            break
        ii = first[rng.integers(0, first.size, todo.size)]
        kk = key(ii)
        g = np.minimum(np.searchsorted(uniq, kk), uniq.size - 1)
        has = uniq[g] == kk
        jj = sorted_second[start[g] + (rng.random(todo.size) * count[g]).astype(np.int64)]
        ok = has & (ii != jj)
        if not within:
            ok &= img[ii] != img[jj]
        if same is False:
            ok &= lab[ii] != lab[jj]
        i[todo[ok]], j[todo[ok]] = ii[ok], jj[ok]
    keep = j >= 0
    return i[keep], j[keep]


def sample_heldout_pairs(labels: list[np.ndarray], inside: list[np.ndarray], base_ids, novel_ids,
                         seed: int = HELDOUT_SEED, pairs: int = HELDOUT_PAIRS) -> dict[str, np.ndarray]:
    """The fixed pixel pairs of the held-out diagnostics, from label maps at feature resolution
    (:func:`feature_labels`) alone: ``{"img_a", "pix_a", "img_b", "pix_b", "pool", "within"}`` (flat
    pixel index within the image's feature map; ``pool`` indexes :data:`POOLS`). ``pairs`` is split
    evenly over the five pools, each half within one image and half across two. Deterministic
    for ``seed`` and the labels; at most :data:`PIXELS_PER_IMAGE` pixels of an image take part."""
    rng = np.random.default_rng(seed)
    imgs, pixs, labs = [], [], []
    for n, (lab, ins) in enumerate(zip(labels, inside)):
        pix = np.flatnonzero(np.asarray(ins).reshape(-1))
        if pix.size > PIXELS_PER_IMAGE:
            pix = np.sort(rng.choice(pix, PIXELS_PER_IMAGE, replace=False))
        imgs.append(np.full(pix.size, n, np.int32))
        pixs.append(pix.astype(np.int64))
        labs.append(np.asarray(lab).reshape(-1)[pix].astype(np.int64))
    img, pix, lab = np.concatenate(imgs), np.concatenate(pixs), np.concatenate(labs)
    ids = np.arange(img.size)
    base = ids[np.isin(lab, np.asarray(base_ids, np.int64))]
    novel = ids[np.isin(lab, np.asarray(novel_ids, np.int64))]
    unlabelled = ids[lab == IGNORE]
    rules = {"base_same": (base, base, True), "base_diff": (base, base, False), "novel_same": (novel, novel, True),
             "novel_diff": (novel, novel, False), "novel_unlabelled": (novel, unlabelled, None)}
    per_pool = pairs // len(POOLS)
    out = {k: [] for k in ("a", "b", "pool", "within")}
    for p, name in enumerate(POOLS):
        first, second, same = rules[name]
        for within, n in ((True, per_pool // 2), (False, per_pool - per_pool // 2)):
            a, b = _draw(rng, n, first, second, img, lab, same, within)
            out["a"].append(a)
            out["b"].append(b)
            out["pool"].append(np.full(a.size, p, np.int8))
            out["within"].append(np.full(a.size, within))
    a, b = np.concatenate(out["a"]), np.concatenate(out["b"])
    return {"img_a": img[a], "pix_a": pix[a], "img_b": img[b], "pix_b": pix[b],
            "pool": np.concatenate(out["pool"]), "within": np.concatenate(out["within"])}


def load_simnet(ck: Mapping) -> torch.nn.Module | None:
    """The SimNet saved in an exported model (``ck["simnet"]``, :func:`pipeline.engine.train.export_model`),
    in eval mode; None when the model was trained without one (or exported before it was saved)."""
    state = ck.get("simnet")
    if not state:
        return None
    from ..model.simnet import SimNet
    width, two_c = state["stem.0.weight"].shape
    blocks = {k.split(".")[1] for k in state if k.startswith("blocks.")}
    convs = int(ck.get("params", {}).get("loss", {}).get("simnet_block_convs", 1))
    net = SimNet(two_c // 2, width, num_blocks=len(blocks), block_convs=convs)
    net.load_state_dict(state)
    return net.eval()


class HeldoutPairs:
    """The fixed held-out pixel pairs of a test split (:func:`sample_heldout_pairs`, from its label
    maps alone) and what scoring them needs: which pixels of which image take part.

    Two ways to get the model's outputs on the test images: :meth:`forward` runs its own forward
    passes, batched (:data:`BATCH` images of one padded size); :meth:`capture` instead gathers the
    pixels from the forward passes of an evaluation run inside it (one image per pass, the test
    images in index order, each zero-padded to a multiple of 32: what
    :func:`pipeline.engine.evaluate.evaluate` does), so scoring costs no forward pass of its own.
    :meth:`score` then returns the AUCs."""

    def __init__(self, dataset_dir: str | Path, index: dict, split: dict, seed: int = HELDOUT_SEED,
                 pairs: int = HELDOUT_PAIRS, *, short_edge: int = 0, max_edge: int = 0, max_images: int = 0):
        self.entries = index["test"][:max_images] if max_images else index["test"]
        if not self.entries:
            raise ValueError(f"no test images for the held-out similarity diagnostics in '{dataset_dir}'")
        self.dataset_dir, self.short_edge, self.max_edge = Path(dataset_dir), short_edge, max_edge
        self.novel = list(split["novel"])
        labels, inside = [], []
        for e in self.entries:
            fl, fi = feature_labels(read_label(self.dataset_dir / e["label"]), short_edge, max_edge)
            labels.append(fl)
            inside.append(fi)
        self.shapes = [lab.shape for lab in labels]        # feature-map size of each image's input
        self.pairs = pr = sample_heldout_pairs(labels, inside, split["base"], split["novel"], seed, pairs)
        # the pixels that take part, per image, and their row in the gathered features / scores
        n = len(pr["img_a"])
        if n == 0:
            self.row_a = self.row_b = np.empty(0, np.int64)
            self.wanted, self.num_pixels = {}, 0
            self._reset()
            return
        ends = np.concatenate([np.stack([pr["img_a"], pr["pix_a"]], 1), np.stack([pr["img_b"], pr["pix_b"]], 1)])
        uniq, row = np.unique(ends, axis=0, return_inverse=True)
        row = row.reshape(-1)
        self.row_a, self.row_b = row[:n], row[n:]
        self.wanted: dict[int, tuple[list[int], list[int]]] = {}
        for r, (img, pix) in enumerate(uniq):
            self.wanted.setdefault(int(img), ([], []))
            self.wanted[int(img)][0].append(int(pix))
            self.wanted[int(img)][1].append(r)
        self.num_pixels = len(uniq)
        self._reset()

    def _reset(self) -> None:
        self._feat: list[torch.Tensor] = []
        self._score: list[torch.Tensor] = []
        self._rows: list[int] = []
        self._seen = 0

    def _gather(self, out: Mapping[str, torch.Tensor], images: list[int]) -> None:
        """Take the wanted pixels of ``images`` (the batch's test images, in order) from one output."""
        mf = out["mask_features"].detach().float()
        nov = torch.tensor(self.novel, dtype=torch.long, device=mf.device)
        sm = novel_score_map(out["pred_logits"].detach(), out["pred_masks"].detach(), nov)
        for k, n in enumerate(images):
            if n not in self.wanted:
                continue
            pix = torch.tensor(self.wanted[n][0], dtype=torch.long, device=mf.device)
            self._feat.append(mf[k].reshape(mf.shape[1], -1)[:, pix].t().cpu())
            self._score.append(sm[k].reshape(sm.shape[1], -1)[:, pix].t().cpu())
            self._rows.extend(self.wanted[n][1])

    def _complete(self) -> bool:
        return len(self._rows) == self.num_pixels

    @torch.no_grad()
    def forward(self, model: torch.nn.Module, device: torch.device | None = None) -> None:
        """Run the model (eval mode) over the test images that hold a pair's pixel, batched."""
        self._reset()
        device = device or next(model.parameters()).device
        model.eval()
        batch: list[tuple[int, torch.Tensor]] = []

        def flush():
            if batch:
                self._gather(model(torch.stack([t for _, t in batch]).to(device).float()), [n for n, _ in batch])
                batch.clear()

        for n in sorted(self.wanted):
            img = resize_for_test(read_image(self.dataset_dir / self.entries[n]["image"]), self.short_edge,
                                  self.max_edge)
            h, w = img.shape[:2]
            ph, pw = _padded(h, w)
            t = F.pad(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), (0, pw - w, 0, ph - h))
            if batch and (len(batch) >= BATCH or batch[0][1].shape != t.shape):
                flush()
            batch.append((n, t))
        flush()

    @contextlib.contextmanager
    def capture(self, model: torch.nn.Module):
        """Gather the pixels from the forward passes of ``model`` inside the block (an evaluation of
        the same test images, in index order, one image per pass). A pass whose feature map does
        not have the planned image's size stops the capture; :meth:`score` then runs
        :meth:`forward` itself, so the result never depends on how the block ran the model."""
        self._reset()
        state = {"ok": True}

        def hook(_module, _inputs, out):
            if not state["ok"] or not isinstance(out, Mapping) or "mask_features" not in out:
                return
            mf = out["mask_features"]
            images = list(range(self._seen, self._seen + mf.shape[0]))
            if images[-1] >= len(self.shapes) or any(tuple(mf.shape[-2:]) != tuple(self.shapes[n]) for n in images):
                state["ok"] = False
                return
            with torch.no_grad():
                self._gather(out, images)
            self._seen += len(images)

        handle = model.register_forward_hook(hook)
        try:
            yield self
        finally:
            handle.remove()
        if not (state["ok"] and self._seen == len(self.entries) and self._complete()):
            self._reset()

    @torch.no_grad()
    def score(self, simnet: torch.nn.Module | None, model: torch.nn.Module | None = None,
              device: torch.device | None = None) -> dict[str, float]:
        """``{"heldout_auc_<scorer>_<kind>": auc, "heldout_pairs_<kind>": pairs scored}`` from the
        gathered outputs (without them - no :meth:`capture` block, or an incomplete one - from
        :meth:`forward` of ``model``). ``simnet`` None: its AUCs are NaN, as is any AUC whose
        positives or negatives are missing (no unlabelled pixel in the test split, say). SimNet runs
        in eval mode (its mode is restored afterwards)."""
        if self.num_pixels == 0:        # no pair at all (a tiny test split): every AUC undefined
            return {**{k: float("nan") for k in METRIC_KEYS}, **{f"heldout_pairs_{k}": 0.0 for k in KINDS}}
        if not self._complete():
            if model is None:
                raise ValueError("HeldoutPairs.score: no model outputs gathered and no model given")
            self.forward(model, device)
        order = torch.tensor(np.argsort(np.asarray(self._rows)), dtype=torch.long)
        feats, scores = torch.cat(self._feat)[order], torch.cat(self._score)[order]
        fa, fb = feats[self.row_a], feats[self.row_b]
        sa, sb = F.normalize(scores[self.row_a], dim=1, eps=1e-8), F.normalize(scores[self.row_b], dim=1, eps=1e-8)
        values = {"student": F.relu((sa * sb).sum(1)),
                  "feature": (F.normalize(fa, dim=1, eps=1e-8) * F.normalize(fb, dim=1, eps=1e-8)).sum(1)}
        if simnet is not None:
            was_training = simnet.training
            simnet.eval()
            try:
                dev = next(simnet.parameters()).device
                values["simnet"] = torch.cat([simnet(fa[k:k + 20_000].to(dev), fb[k:k + 20_000].to(dev)).float().cpu()
                                              for k in range(0, len(fa), 20_000)])
            finally:
                simnet.train(was_training)
        pool = self.pairs["pool"]
        sets = {"base": (POOLS.index("base_same"), POOLS.index("base_diff")),
                "novel": (POOLS.index("novel_same"), POOLS.index("novel_diff")),
                "novel_unlabelled": (POOLS.index("novel_same"), POOLS.index("novel_unlabelled"))}
        out: dict[str, float] = {}
        for kind, (pos, neg) in sets.items():
            m = (pool == pos) | (pool == neg)
            y = pool[m] == pos
            for scorer in SCORERS:
                v = values.get(scorer)
                out[metric_key(scorer, kind)] = pair_auc(v.numpy()[m], y) if v is not None else float("nan")
            out[f"heldout_pairs_{kind}"] = float(m.sum())
        return out


def heldout_similarity(model: torch.nn.Module, simnet: torch.nn.Module | None, dataset_dir: str | Path, index: dict,
                       split: dict, seed: int = HELDOUT_SEED, pairs: int = HELDOUT_PAIRS, *, short_edge: int = 0,
                       max_edge: int = 0, max_images: int = 0, device: torch.device | None = None) -> dict[str, float]:
    """AUC of each scorer (:data:`SCORERS`) on each kind of held-out test pixel pair (:data:`KINDS`),
    with forward passes of its own (:class:`HeldoutPairs`; to reuse an evaluation's passes, use its
    :meth:`~HeldoutPairs.capture`). ``short_edge`` / ``max_edge``: the test-time resize
    (``data.test_short_edge`` / ``test_max_edge``); ``max_images``: only the first N test images
    (``eval.max_images``; 0 = all)."""
    hp = HeldoutPairs(dataset_dir, index, split, seed, pairs, short_edge=short_edge, max_edge=max_edge,
                      max_images=max_images)
    return hp.score(simnet, model, device)
