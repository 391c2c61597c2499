"""Training diagnostics of the dual similarity transfer (logged, never trained on).

* :func:`pair_auc` - the area under the ROC curve of a pair score against "same class".
* :func:`novel_pair_auc` - on pixel pairs drawn from **novel** ground-truth pixels of image
  pairs, the AUC of SimNet's similarity (the teacher of DistLoss) and of the student's own
  ReLU(cos) of novel score vectors. Ground truth is used here only to *measure*: DistLoss
  can help only where the teacher ranks pairs better than the student already does.
* :func:`loss_gradient_norms` - each paper loss's weighted gradient norm on a module (the
  pixel decoder): how hard each term pulls on the shared features.

Everything here runs on the step's existing graph and tensors, with its own random
generator, in ``torch.no_grad`` where it can: it changes no weight, no RNG stream and no
running statistic of the training.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import mannwhitneyu

from ..losses.similarity import downsample_labels, novel_score_map

from ..losses.criterion import TERMS as PAPER_TERMS


def pair_auc(scores: np.ndarray | torch.Tensor, same: np.ndarray | torch.Tensor) -> float:
    """ROC AUC of ``scores`` for the binary labels ``same`` (ties count one half); NaN
    when either class is empty. Equals P(score of a random positive > score of a random negative)."""
    s = np.asarray(scores.detach().cpu() if torch.is_tensor(scores) else scores, dtype=np.float64).ravel()
    y = np.asarray(same.detach().cpu() if torch.is_tensor(same) else same).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    return float(mannwhitneyu(pos, neg, alternative="two-sided").statistic / (pos.size * neg.size))


@torch.no_grad()
def novel_pair_auc(simnet: torch.nn.Module | None, outputs: Mapping[str, torch.Tensor],
                   targets: Sequence[Mapping[str, torch.Tensor]], novel_ids: torch.Tensor,
                   points: int = 64, generator: torch.Generator | None = None) -> dict[str, float]:
    """``{"auc_simnet", "auc_student", "novel_pairs"}`` over the image pairs (0, 1), (2, 3), ...

    Per image ``points`` pixels (mask-feature resolution) drawn uniformly from its novel
    ground-truth pixels; every cross-image pixel pair is scored by SimNet (eval mode: running
    BatchNorm statistics, so the training batch statistics are untouched) and by the student
    ReLU(cos(s(x_i), s(x_j))). Label: same novel class. Image pairs with no novel pixel on
    either side are skipped; NaN when no pair of both kinds was seen.
    """
    feats = outputs["mask_features"].detach().float()
    masks = outputs["pred_masks"].detach()
    bsz, c, h, w = feats.shape
    nov = novel_ids.reshape(-1).long().to(feats.device)
    score_map = novel_score_map(outputs["pred_logits"].detach(), masks, nov)          # B x N x h x w
    t_all, s_all, y_all = [], [], []
    for a, b in ((2 * k, 2 * k + 1) for k in range(bsz // 2)):
        picks = []
        for i in (a, b):
            lab = downsample_labels(targets[i]["sem_seg"], (h, w), targets[i].get("valid")).reshape(-1)
            cand = torch.isin(lab, nov).nonzero().flatten().cpu()
            if cand.numel() == 0:
                break
            idx = cand[torch.randint(0, cand.numel(), (points,), generator=generator)].to(feats.device)
            picks.append((idx, lab[idx]))
        if len(picks) < 2:
            continue
        (ia, la), (ib, lb) = picks
        fa = feats[a].reshape(c, -1)[:, ia].t()
        fb = feats[b].reshape(c, -1)[:, ib].t()
        p = ia.numel()
        sa = F.normalize(score_map[a].reshape(nov.numel(), -1)[:, ia].t(), dim=1, eps=1e-8)
        sb = F.normalize(score_map[b].reshape(nov.numel(), -1)[:, ib].t(), dim=1, eps=1e-8)
        s_all.append(F.relu(sa @ sb.t()).reshape(-1))
        y_all.append((la[:, None] == lb[None, :]).reshape(-1))
        if simnet is not None:
            ra = fa[:, None, :].expand(p, p, c).reshape(-1, c)
            rb = fb[None, :, :].expand(p, p, c).reshape(-1, c)
            was_training = simnet.training
            simnet.eval()
            try:
                t_all.append(simnet(ra, rb).float())
            finally:
                simnet.train(was_training)
    if not y_all:
        return {"auc_simnet": float("nan"), "auc_student": float("nan"), "novel_pairs": 0.0}
    y = torch.cat(y_all)
    return {"auc_simnet": pair_auc(torch.cat(t_all), y) if t_all else float("nan"),
            "auc_student": pair_auc(torch.cat(s_all), y), "novel_pairs": float(y.numel())}


def loss_gradient_norms(losses: Mapping[str, torch.Tensor], weight_dict: Mapping[str, float],
                        params: Iterable[torch.nn.Parameter]) -> dict[str, float]:
    """``{"grad_<PaperName>": norm}``: the L2 norm of d(weight * term)/d``params`` for each paper
    loss (a term's aux-layer copies and MaskLoss's focal + dice summed first).

    Uses ``retain_graph=True``: call it before the step's own ``backward``. A term that does not
    reach ``params`` (SimLoss reads detached features) has norm 0.
    """
    params = [q for q in params if q.requires_grad]
    if not params:
        raise ValueError("loss_gradient_norms: no parameter requires a gradient")
    grouped: dict[str, torch.Tensor] = {}
    for name, value in losses.items():
        stem = name.rstrip("0123456789").rstrip("_") if name[-1].isdigit() else name
        paper = PAPER_TERMS.get(stem)
        if paper is None or not value.requires_grad:
            continue
        term = value * float(weight_dict.get(name, 0.0))
        grouped[paper] = grouped[paper] + term if paper in grouped else term
    out = {}
    for paper, term in grouped.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        sq = sum(float(g.detach().float().pow(2).sum()) for g in grads if g is not None)
        out[f"grad_{paper}"] = sq ** 0.5
    return out


def similarity_diagnostics(base_ids: torch.Tensor, novel_ids: torch.Tensor, seed: int, every: int,
                           oracle: bool = False, points: int = 64):
    """The training loop's ``diagnostics(state, batch)`` hook: every ``every`` steps (at log steps),
    one more forward pass on the step's batch with the weights after the step, then
    :func:`loss_gradient_norms` on the pixel decoder and :func:`novel_pair_auc`.

    Side effects are undone: BatchNorm running statistics and every other buffer of the model
    and the criterion (SimLoss's pair counts) are restored, nothing is accumulated into
    ``.grad``, and the training loop forks the RNG streams around the call.
    """
    from ..data.targets import weak_shot_targets

    def hook(state, batch: dict) -> dict:
        if every <= 0 or state.step % every:
            return {}
        model, criterion = state.model, state.criterion
        device = next(model.parameters()).device
        saved = [(b, b.detach().clone()) for m in (model, criterion) for b in m.buffers()]
        try:
            images = batch["image"].to(device).float()
            sem_seg, valid = batch["sem_seg"].to(device), batch["valid"].to(device)
            targets = weak_shot_targets(sem_seg, valid, base_ids.to(device), novel_ids.to(device), oracle)
            gen = torch.Generator().manual_seed(seed * 7_919 + state.step)
            outputs = model(images)
            losses = criterion(outputs, targets, gen, step=state.step - 1)     # the step just taken
            # on the pixel decoder; when it is frozen (train.freeze), on the trainable rest of the model
            params = [q for q in model.pixel_decoder.parameters() if q.requires_grad] or \
                [q for n, q in model.named_parameters() if q.requires_grad and not n.startswith("backbone.")]
            out = loss_gradient_norms(losses, criterion.weight_dict, params)
            simnet = getattr(getattr(criterion, "similarity", None), "simnet", None)
            out.update(novel_pair_auc(simnet, outputs, targets, novel_ids, points, gen))
        finally:
            with torch.no_grad():
                for b, copy in saved:
                    b.copy_(copy)
        return out

    return hook


def diagnostics_hook(every: int, split: Mapping, seed: int, oracle: bool):
    """The training loop's similarity diagnostics (``train.diagnostics_interval`` = ``every``;
    0 = none) for the split's base and novel classes."""
    if not every:
        return None
    return similarity_diagnostics(torch.tensor(split["base"]), torch.tensor(split["novel"]), seed, every, oracle)
