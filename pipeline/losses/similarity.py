"""SimFormer's dual similarity transfer: SimLoss (pixel-pixel similarity learned on base
classes by SimNet) and DistLoss (that similarity distilled onto the novel score maps).

Paper: "Weak-shot Semantic Segmentation via Dual Similarity Transfer" (NeurIPS 2022),
losses 5 and 6 of ``shared/reference/SIMFORMER.md``. Each equation is one function:

* :func:`sample_similarity_points` - the 100 pixels per image of SimLoss (80 from a base
  class shared by the image pair, 20 elsewhere);
* :func:`similarity_targets` - the pixel-pair label "same class" and which pairs count;
* :func:`class_balanced_bce` - the class-balanced binary cross-entropy of SimLoss;
* :func:`sim_loss` - **SimLoss**;
* :func:`novel_score_map` - the novel score map ``s(x)``;
* :func:`pixel_pair_distillation` - the pixel-pair distillation term (``cce`` / ``ce``);
* :func:`simnet_teacher` / :func:`oracle_teacher` - DistLoss's teacher, chosen by name
  (:data:`DIST_TEACHERS`, ``loss.pp_teacher``): SimNet's similarity (the paper) or the true
  same-class relation (the headroom control; it reads novel labels: a diagnostic only);
* :func:`dist_loss` - **DistLoss**;
* :class:`DualSimilarityLoss` - the module holding SimNet, its statistics and settings.

Conventions. Batches are arranged as image pairs: images ``(0, 1), (2, 3), ...``; an odd
last image takes part in neither loss. Label maps (``targets[i]["sem_seg"]``, crop
resolution, 255 = ignore and padding) are downsampled with nearest-neighbour to the
mask-feature resolution (stride 4). All random sampling runs on the CPU with the
``torch.Generator`` passed in, so a step is reproducible on any device.

Pair validity (SimLoss). The full label map tells whether a pixel is base; a novel pixel
is known to be "not base" but its class is otherwise unknown. Hence a pixel pair counts
when at least one of its pixels is base and neither is 255: (base, base) pairs are
positives or negatives, (base, novel) pairs are negatives, (novel, novel) pairs are left
out, and any pair with an ignore/padding pixel is left out.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PP_FORMS, PP_PAIRINGS, PP_TEACHERS
from ..data import IGNORE
from ..model.simnet import SimNet

_EPS = 1e-6


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def downsample_labels(sem_seg: torch.Tensor, size: Sequence[int], valid: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest-neighbour downsampling of an ``H x W`` label map to ``size`` (``h, w``).

    Pixels where ``valid`` (``H x W`` bool, False on padding) is False become 255.
    """
    size = (int(size[0]), int(size[1]))
    lab = sem_seg.long()
    if valid is not None:
        lab = torch.where(valid.bool(), lab, torch.full_like(lab, IGNORE))
    if tuple(lab.shape[-2:]) == size:
        return lab
    return F.interpolate(lab[None, None].float(), size=size, mode="nearest")[0, 0].long()


def _downsample_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    size = (int(size[0]), int(size[1]))
    if tuple(mask.shape[-2:]) == size:
        return mask.bool()
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5


def _pick(candidates: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` entries of the 1-D CPU tensor ``candidates``: without replacement when there
    are enough, with replacement otherwise; empty when there are no candidates or n == 0."""
    m = candidates.numel()
    if m == 0 or n <= 0:
        return candidates.new_empty((0,))
    if m >= n:
        return candidates[torch.randperm(m, generator=generator)[:n]]
    return candidates[torch.randint(0, m, (n,), generator=generator)]


def _pair_rows(f_a: torch.Tensor, f_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``P_a x P_b`` cross pairs of two ``P x C`` feature sets, row-major (a outer)."""
    pa, c = f_a.shape
    pb = f_b.shape[0]
    return (f_a[:, None, :].expand(pa, pb, c).reshape(pa * pb, c),
            f_b[None, :, :].expand(pa, pb, c).reshape(pa * pb, c))


def _image_pairs(batch_size: int) -> list[tuple[int, int]]:
    return [(2 * k, 2 * k + 1) for k in range(batch_size // 2)]


# --------------------------------------------------------------------------------------
# SimLoss
# --------------------------------------------------------------------------------------
def sample_similarity_points(labels_a: torch.Tensor, labels_b: torch.Tensor, base_ids: torch.Tensor,
                             num_points: int = 100, num_base_points: int = 80,
                             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel sampling of SimLoss for one image pair (a, b).

    ``labels_a`` / ``labels_b``: label maps at mask-feature resolution (any shape, flattened
    here; 255 = ignore/padding). Per image, ``num_points`` flat pixel indices (CPU LongTensor):

    * ``num_base_points`` from one base class present in both images, chosen at random
      (uniformly among the shared base classes); when no base class is shared, from any
      base pixel of the image; when the image has no base pixel, none (the rest grows);
    * the remaining points uniformly among the image's valid (non-255) pixels outside that
      base region (all valid pixels when that is empty; all pixels when none is valid -
      such pixels then form no valid pair).

    Points are drawn without replacement when a region is large enough, with replacement
    otherwise, so each image always yields exactly ``num_points`` indices.
    """
    if not 0 <= num_base_points <= num_points:
        raise ValueError(f"num_base_points ({num_base_points}) must be within 0..num_points ({num_points})")
    la = labels_a.reshape(-1).long().cpu()
    lb = labels_b.reshape(-1).long().cpu()
    base = base_ids.reshape(-1).long().cpu()
    base_a, base_b = torch.isin(la, base), torch.isin(lb, base)
    shared = sorted(set(la[base_a].unique().tolist()) & set(lb[base_b].unique().tolist()))
    if shared:
        c = shared[int(torch.randint(0, len(shared), (1,), generator=generator))]
        regions = (la == c, lb == c)
    else:
        regions = (base_a, base_b)

    out = []
    for lab, region in ((la, regions[0]), (lb, regions[1])):
        idx_base = _pick(region.nonzero().flatten(), num_base_points, generator)
        known = lab != IGNORE
        rest = (known & ~region).nonzero().flatten()
        if rest.numel() == 0:
            rest = known.nonzero().flatten()
        if rest.numel() == 0:
            rest = torch.arange(lab.numel())
        idx_rest = _pick(rest, num_points - idx_base.numel(), generator)
        out.append(torch.cat([idx_base, idx_rest]))
    return out[0], out[1]


def similarity_targets(labels_a: torch.Tensor, labels_b: torch.Tensor,
                       base_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-pair targets of SimLoss for all ``P_a x P_b`` cross-image pairs.

    ``labels_a`` (``P_a``) and ``labels_b`` (``P_b``) are the labels of the sampled pixels.
    Returns ``(target, valid)``, both ``P_a x P_b``: ``target`` = 1.0 where the two labels are
    equal (float); ``valid`` = at least one pixel is base AND neither is 255. (base, novel)
    pairs are valid negatives; (novel, novel) pairs are not valid (novel pixels are unknown).
    """
    la = labels_a.reshape(-1).long()
    lb = labels_b.reshape(-1).long()
    base = base_ids.reshape(-1).long().to(la.device)
    is_base_a, is_base_b = torch.isin(la, base), torch.isin(lb, base)
    known_a, known_b = la != IGNORE, lb != IGNORE
    valid = (is_base_a[:, None] | is_base_b[None, :]) & known_a[:, None] & known_b[None, :]
    target = (la[:, None] == lb[None, :]).float()
    return target, valid


class SimilarityStats(nn.Module):
    """Running counts of valid positive and negative pixel pairs seen by SimLoss.

    Buffers (float64, saved in ``state_dict`` so a resumed run continues them): ``pos``,
    ``neg``. :func:`class_balanced_bce` adds each call's counts before weighting.
    """

    pos: torch.Tensor
    neg: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("pos", torch.zeros((), dtype=torch.float64))
        self.register_buffer("neg", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, n_pos: torch.Tensor | float, n_neg: torch.Tensor | float) -> None:
        self.pos += torch.as_tensor(n_pos, dtype=torch.float64, device=self.pos.device)
        self.neg += torch.as_tensor(n_neg, dtype=torch.float64, device=self.neg.device)


def class_balanced_bce(prob: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
                       stats: SimilarityStats, normalizer=None) -> torch.Tensor:
    """Class-balanced binary cross-entropy of SimLoss.

    First the call's valid positive / negative pair counts are added to ``stats`` (the
    running totals ``N+`` and ``N-``)::

        w+ = N- / (N+ + N-)     (positives weighted by the negative share)
        w- = N+ / (N+ + N-)     (negatives weighted by the positive share)
        L  = sum_valid [ -w+ * y * log p  -  w- * (1 - y) * log(1 - p) ] / #valid

    ``p`` is clamped to ``[1e-6, 1 - 1e-6]``. No valid pair gives 0.

    ``normalizer`` (multi-process training, ``pipeline.engine.distributed.GlobalCount``): the
    call's counts are summed over the ranks first, so every rank adds the same global counts
    to ``stats``, and the sum is divided by ``#valid over the ranks / world_size``.
    """
    prob = prob.float().reshape(-1)
    y = target.float().reshape(-1)
    v = valid.reshape(-1).bool()
    pos_mask = v & (y > 0.5)
    neg_mask = v & ~(y > 0.5)
    n_pos, n_neg = pos_mask.sum(), neg_mask.sum()
    if normalizer is not None:          # global counts (float64, one all-reduce)
        n_pos, n_neg = normalizer.total(torch.stack([n_pos, n_neg])).unbind(0)
    stats.update(n_pos, n_neg)
    tot_pos = stats.pos.to(device=prob.device, dtype=torch.float32)
    tot_neg = stats.neg.to(device=prob.device, dtype=torch.float32)
    total = (tot_pos + tot_neg).clamp_min(1.0)
    w_pos, w_neg = tot_neg / total, tot_pos / total
    p = prob.clamp(_EPS, 1.0 - _EPS)
    per_pair = -(w_pos * y * torch.log(p) + w_neg * (1.0 - y) * torch.log1p(-p))
    per_pair = torch.where(v, per_pair, torch.zeros_like(per_pair))
    if normalizer is not None:
        return per_pair.sum() / ((n_pos + n_neg).clamp_min(1) / normalizer.world_size).float()
    return per_pair.sum() / v.sum().clamp_min(1).float()


def sim_loss(simnet: SimNet, mask_features: torch.Tensor, targets: Sequence[Mapping[str, torch.Tensor]],
             base_ids: torch.Tensor, stats: SimilarityStats,
             num_points: int = 100, num_base_points: int = 80,
             generator: torch.Generator | None = None, normalizer=None) -> torch.Tensor:
    """**SimLoss**: SimNet learns pixel-pair similarity from base-class labels.

    For every image pair (0, 1), (2, 3), ...: sample pixels with
    :func:`sample_similarity_points`, build all ``P x P`` cross-image pairs of the
    *detached* ``mask_features`` (so only SimNet is trained by this loss), label them with
    :func:`similarity_targets`, and score the SimNet probabilities of all pairs of the batch
    (one SimNet call) with :func:`class_balanced_bce`. Fewer than 2 images: 0, no SimNet call.
    ``normalizer``: see :func:`class_balanced_bce`.
    """
    feats = mask_features.detach()
    bsz, c, h, w = feats.shape
    pairs = _image_pairs(bsz)
    if not pairs:
        if normalizer is not None:      # the count reduction is a collective: take part with no pairs
            empty = feats.new_zeros((0,), dtype=torch.float32)
            class_balanced_bce(empty, empty, empty.bool(), stats, normalizer)
        return feats.new_zeros((), dtype=torch.float32)
    rows_a, rows_b, tgts, vals = [], [], [], []
    for a, b in pairs:
        la = downsample_labels(targets[a]["sem_seg"], (h, w), targets[a].get("valid")).reshape(-1)
        lb = downsample_labels(targets[b]["sem_seg"], (h, w), targets[b].get("valid")).reshape(-1)
        ia, ib = sample_similarity_points(la, lb, base_ids, num_points, num_base_points, generator)
        ia, ib = ia.to(feats.device), ib.to(feats.device)
        fa = feats[a].reshape(c, -1)[:, ia].t()
        fb = feats[b].reshape(c, -1)[:, ib].t()
        ra, rb = _pair_rows(fa, fb)
        rows_a.append(ra)
        rows_b.append(rb)
        t, v = similarity_targets(la.to(feats.device)[ia], lb.to(feats.device)[ib], base_ids)
        tgts.append(t.reshape(-1))
        vals.append(v.reshape(-1))
    prob = simnet(torch.cat(rows_a), torch.cat(rows_b))
    if normalizer is not None:
        return class_balanced_bce(prob, torch.cat(tgts), torch.cat(vals), stats, normalizer)
    return class_balanced_bce(prob, torch.cat(tgts), torch.cat(vals), stats)


# --------------------------------------------------------------------------------------
# DistLoss
# --------------------------------------------------------------------------------------
def novel_score_map(pred_logits: torch.Tensor, pred_masks: torch.Tensor, novel_ids: torch.Tensor) -> torch.Tensor:
    """Novel score map ``s(x)``: ``B x N_novel x h x w``.

    ``s_c(x) = sum_q softmax(cls_q)[c] * sigmoid(mask_q(x))`` for each novel class ``c``,
    with the softmax over all ``K+1`` logits (no-object included) before the novel columns
    ``novel_ids`` are taken. ``pred_logits``: ``B x Q x (K+1)``; ``pred_masks``: ``B x Q x h x w``.
    """
    ids = novel_ids.reshape(-1).long().to(pred_logits.device)
    cls = torch.softmax(pred_logits.float(), dim=-1)[..., ids]          # B x Q x N
    return torch.einsum("bqn,bqhw->bnhw", cls, pred_masks.float().sigmoid())


def pixel_pair_distillation(teacher: torch.Tensor, student: torch.Tensor, form: str = "cce",
                            valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-pair distillation term of DistLoss, mean over all pairs (over the pairs where
    ``valid``, a same-shaped bool tensor, is True when it is given; 0 when none is).

    ``teacher`` ``t`` (SimNet similarity) and ``student`` ``s`` (ReLU cosine of novel score
    vectors) are same-shaped tensors in ``[0, 1]``.

    * ``cce``: ``-ReLU(t - 0.5) * log(1 + s) - ReLU(0.5 - t) * log(2 - s)`` (the paper's
      form: pulls ``s`` up where the teacher says "similar", down where it says "dissimilar",
      with strength ``|t - 0.5|``);
    * ``ce``: binary cross-entropy with the soft target ``t``:
      ``-t * log s - (1 - t) * log(1 - s)``, ``s`` clamped to ``[1e-6, 1 - 1e-6]``.
    """
    t = teacher.float()
    s = student.float()
    if t.shape != s.shape:
        raise ValueError(f"teacher {tuple(t.shape)} and student {tuple(s.shape)} shapes differ")
    if form == "cce":
        loss = -F.relu(t - 0.5) * torch.log1p(s) - F.relu(0.5 - t) * torch.log(2.0 - s)
    elif form == "ce":
        sc = s.clamp(_EPS, 1.0 - _EPS)
        loss = -(t * torch.log(sc) + (1.0 - t) * torch.log1p(-sc))
    else:
        raise ValueError(f"unknown distillation form {form!r}; allowed: {', '.join(PP_FORMS)}")
    if valid is None:
        return loss.mean()
    v = valid.reshape(loss.shape).bool()
    return torch.where(v, loss, torch.zeros_like(loss)).sum() / v.sum().clamp_min(1).float()


def simnet_teacher(simnet: SimNet, feats: torch.Tensor, picks: Sequence[tuple]) -> list[tuple[torch.Tensor, None]]:
    """DistLoss's teacher of the paper: per image pair ``(a, b, ia, ib, la, lb)`` of ``picks``,
    ``t[i, j]`` = SimNet(f_a(x_i), f_b(x_j)) on the detached ``feats`` (``B x C x h x w``), under
    ``torch.no_grad()``, all pairs of all image pairs in one SimNet call (in training mode its
    BatchNorm uses the statistics of these pairs). Every pair has a teacher (``valid`` None)."""
    c = feats.shape[1]
    with torch.no_grad():
        rows = [_pair_rows(feats[a].reshape(c, -1)[:, ia].t(), feats[b].reshape(c, -1)[:, ib].t())
                for a, b, ia, ib, _, _ in picks]
        t_all = simnet(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])).float()
    out, k = [], 0
    for _, _, ia, ib, _, _ in picks:
        n = ia.numel() * ib.numel()
        out.append((t_all[k:k + n].reshape(ia.numel(), ib.numel()), None))
        k += n
    return out


def oracle_teacher(simnet: SimNet | None, feats: torch.Tensor,
                   picks: Sequence[tuple]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The headroom control's teacher (``loss.pp_teacher: oracle``): ``t[i, j]`` = 1.0 when the
    true labels ``la[i]`` and ``lb[j]`` (from the full label maps, *novel masks included*) are
    equal, else 0.0 - what a perfect SimNet would say. A pair with a 255 (ignore / unknown) pixel
    has no teacher: ``valid`` is False there and the pair is left out of the loss. A diagnostic
    of how much DistLoss could give at best, never a weak-shot method. SimNet is not called."""
    out = []
    for _, _, ia, ib, la, lb in picks:
        la, lb = la.to(feats.device).long(), lb.to(feats.device).long()
        valid = (la != IGNORE)[:, None] & (lb != IGNORE)[None, :]
        out.append(((la[:, None] == lb[None, :]).float(), valid))
    return out


# DistLoss's teacher by name (loss.pp_teacher): f(simnet, detached mask features, picks) -> [(teacher, valid)]
DIST_TEACHERS = {"simnet": simnet_teacher, "oracle": oracle_teacher}
assert tuple(DIST_TEACHERS) == PP_TEACHERS


def _shares_novel(t_a: Mapping[str, torch.Tensor], t_b: Mapping[str, torch.Tensor]) -> bool:
    na = set(torch.as_tensor(t_a["novel_ids"]).reshape(-1).tolist())
    nb = set(torch.as_tensor(t_b["novel_ids"]).reshape(-1).tolist())
    return bool(na & nb)


def dist_loss(simnet: SimNet, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]],
              base_ids: torch.Tensor, novel_ids: torch.Tensor, dist_points: int = 100, dist_form: str = "cce",
              dist_pairing: str = "cross_image", generator: torch.Generator | None = None,
              normalizer=None, *, dist_teacher: str = "simnet") -> torch.Tensor:
    """**DistLoss**: distil SimNet's pixel-pair similarity onto the novel score maps.

    Only image pairs (0, 1), (2, 3), ... whose image-level novel labels
    (``targets[i]["novel_ids"]``) intersect take part. Per image, ``dist_points`` pixels
    (mask-feature resolution) are drawn uniformly from the non-base region: pixels whose
    label is novel or unknown (255 inside the image), padding (``targets[i]["valid"]``
    False) excluded; an image without such pixels drops its pair.

    * teacher ``t[i, j]``, ``P x P``, cross-image, chosen by ``dist_teacher``
      (:data:`DIST_TEACHERS`): ``simnet`` (the paper, :func:`simnet_teacher`) = SimNet(f_a(x_i),
      f_b(x_j)) on the detached ``mask_features`` under ``torch.no_grad()``, SimNet in its
      current mode (in training, BatchNorm uses the statistics of these pairs); ``oracle``
      (:func:`oracle_teacher`, a diagnostic that reads novel labels) = the true "same class"
      of the two pixels, pairs with a 255 pixel left out of the mean. The same pixels are
      sampled for either teacher.
    * student from the novel score vectors ``s(x)`` (:func:`novel_score_map`, ``N_novel``
      entries per pixel): ``ReLU(cos(s(x), s(y)))``.

      - ``dist_pairing="cross_image"`` (default): ``student[i, j]`` pairs pixel ``i`` of image a
        with pixel ``j`` of image b - the same pixel pair as ``t[i, j]``.
      - ``dist_pairing="within_image"`` (the released code's choice): ``student[i, j]`` pairs
        pixels ``i`` and ``j`` of image a, while ``t[i, j]`` still pairs pixel ``i`` of a with
        pixel ``j`` of b. Both are ``P x P`` (each image gives exactly ``dist_points`` pixels),
        so the two matrices are compared entry by entry although entry ``(i, j)`` refers to
        different pixel pairs; image b's score map then receives no gradient.

    The loss is :func:`pixel_pair_distillation` averaged over the pairs of each eligible image
    pair, then over the image pairs (an image pair whose pairs all lack an oracle teacher adds
    0). Gradients reach ``pred_logits`` / ``pred_masks`` only, never SimNet or ``mask_features``
    (through this path). No eligible pair: 0 and no SimNet call.

    ``normalizer`` (multi-process training): the sum over this rank's eligible image pairs is
    divided by ``normalizer(#eligible pairs)`` (their number over the ranks / world_size).
    """
    if dist_pairing not in PP_PAIRINGS:
        raise ValueError(f"unknown dist_pairing {dist_pairing!r}; allowed: {', '.join(PP_PAIRINGS)}")
    if dist_teacher not in DIST_TEACHERS:
        raise ValueError(f"unknown dist_teacher {dist_teacher!r}; allowed: {', '.join(DIST_TEACHERS)}")
    pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
    feats = outputs["mask_features"].detach()
    bsz, q, h, w = pred_masks.shape
    if tuple(feats.shape[-2:]) != (h, w):
        raise ValueError(f"mask_features {tuple(feats.shape[-2:])} and pred_masks {(h, w)} resolutions differ")
    zero = pred_masks.new_zeros((), dtype=torch.float32)
    nov = novel_ids.reshape(-1).long()
    if nov.numel() == 0:
        return zero
    base = base_ids.reshape(-1).long().cpu()

    # (a, b, pixels of a, pixels of b, their labels): labels only for the oracle teacher
    sel: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for a, b in _image_pairs(bsz):
        if not _shares_novel(targets[a], targets[b]):
            continue
        idx, labs = [], []
        for i in (a, b):
            lab = downsample_labels(targets[i]["sem_seg"], (h, w)).reshape(-1).cpu()
            valid = targets[i].get("valid")
            keep = (_downsample_mask(valid, (h, w)).reshape(-1).cpu() if valid is not None
                    else torch.ones_like(lab, dtype=torch.bool))
            cand = (keep & ~torch.isin(lab, base)).nonzero().flatten()
            idx.append(_pick(cand, dist_points, generator))
            labs.append(lab[idx[-1]])
        if idx[0].numel() == 0 or idx[1].numel() == 0:
            continue
        sel.append((a, b, idx[0].to(feats.device), idx[1].to(feats.device), labs[0], labs[1]))
    if normalizer is not None:
        count = normalizer(len(sel), zero.device).float()    # a collective: also with no eligible pair
    if not sel:
        return zero

    teachers = DIST_TEACHERS[dist_teacher](simnet, feats, sel)      # no gradient
    cls = torch.softmax(pred_logits.float(), dim=-1)[..., nov.to(pred_logits.device)]   # B x Q x N

    def scores(i: int, idx: torch.Tensor) -> torch.Tensor:        # P x N novel score vectors s(x)
        m = pred_masks[i].float().reshape(q, -1)[:, idx].sigmoid()  # Q x P
        return F.normalize((cls[i].t() @ m).t(), dim=1, eps=1e-8)

    losses = []
    for (a, b, ia, ib, _, _), (teacher, valid) in zip(sel, teachers):
        sa = scores(a, ia)
        sb = sa if dist_pairing == "within_image" else scores(b, ib)
        student = F.relu(sa @ sb.t())
        losses.append(pixel_pair_distillation(teacher, student, dist_form, valid))
    if normalizer is not None:
        return torch.stack(losses).sum() / count
    return torch.stack(losses).mean()


# --------------------------------------------------------------------------------------
# module
# --------------------------------------------------------------------------------------
class DualSimilarityLoss(nn.Module):
    """SimLoss + DistLoss with their SimNet and running pair statistics.

    ``forward`` returns the *unweighted* terms asked for, ``{"loss_sim", "loss_dist"}``; their
    weights live in the criterion (:class:`~.criterion.SetCriterion`), which says which are on.
    A term not asked for is not computed at all (no SimNet call when both are off). SimNet's
    parameters belong to this module: give them to the optimizer.
    """

    def __init__(self, mask_dim: int, *, sim_points: int = 100, sim_base_points: int = 80,
                 dist_points: int = 100, dist_form: str = "cce", dist_pairing: str = "cross_image",
                 dist_teacher: str = "simnet", simnet_width: int = 256, simnet_block_convs: int = 1):
        super().__init__()      # (dist_form, dist_pairing, sim_base_points: checked where they are used)
        if dist_teacher not in DIST_TEACHERS:
            raise ValueError(f"unknown dist_teacher {dist_teacher!r}; allowed: {', '.join(DIST_TEACHERS)}")
        self.simnet = SimNet(mask_dim, simnet_width, block_convs=simnet_block_convs)
        self.stats = SimilarityStats()
        self.sim_points = int(sim_points)
        self.sim_base_points = int(sim_base_points)
        self.dist_points = int(dist_points)
        self.dist_form = dist_form
        self.dist_pairing = dist_pairing
        self.dist_teacher = dist_teacher

    def forward(self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]],
                base_ids: torch.Tensor, novel_ids: torch.Tensor, generator: torch.Generator | None = None, *,
                sim_enabled: bool = True, dist_enabled: bool = True, normalizer=None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if sim_enabled:
            out["loss_sim"] = sim_loss(self.simnet, outputs["mask_features"], targets, base_ids, self.stats,
                                       self.sim_points, self.sim_base_points, generator, normalizer)
        if dist_enabled:
            out["loss_dist"] = dist_loss(self.simnet, outputs, targets, base_ids, novel_ids, self.dist_points,
                                         self.dist_form, self.dist_pairing, generator, normalizer,
                                         dist_teacher=self.dist_teacher)
        return out
