"""The training loop: AdamW with a backbone lr multiplier, poly schedule, global gradient
clipping, bf16 autocast on CUDA, atomic checkpoints with RNG states, exact resume.

Nothing here imports MLflow: the caller passes ``on_log(step, metrics)`` and
``on_checkpoint(path)`` callbacks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import Params, params_hash, to_dict
from ..data.dataset import TrainCrops, collate_train, worker_init
from ..data.sampler import PairBatchSampler, RandomBatchSampler
from ..data.targets import weak_shot_targets
from ..losses.criterion import SetCriterion
from ..losses.matcher import HungarianMatcher
from ..model import build_model
from .checkpoint import load_checkpoint, save_checkpoint


class NonFiniteLossError(RuntimeError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def build_criterion(p: Params, num_classes: int, base_ids: list[int], novel_ids: list[int]) -> SetCriterion:
    lc = p.loss
    matcher = HungarianMatcher(lc.match_class_cost, lc.match_focal_cost, lc.match_dice_cost,
                               lc.focal_alpha, lc.focal_gamma)
    similarity = None
    if lc.sim_weight > 0 or lc.pp_weight > 0:
        from ..losses.similarity import DualSimilarityLoss
        similarity = DualSimilarityLoss.from_config(lc, p.model.mask_dim)
    return SetCriterion(num_classes, matcher, lc, p.model.dec_layers, similarity,
                        torch.tensor(base_ids, dtype=torch.long), torch.tensor(novel_ids, dtype=torch.long))


def param_groups(model: torch.nn.Module, criterion: torch.nn.Module, lr: float, wd: float,
                 backbone_mult: float) -> list[dict]:
    """Backbone at lr * backbone_mult; no weight decay on norms, biases and embeddings."""
    groups: dict[tuple, list] = {}
    for owner, prefix in ((model, ""), (criterion, "criterion.")):
        for name, prm in owner.named_parameters():
            if not prm.requires_grad:
                continue
            name = prefix + name
            g_lr = lr * backbone_mult if name.startswith("backbone.") else lr
            g_wd = 0.0 if (prm.ndim <= 1 or "query_embed" in name) else wd
            groups.setdefault((g_lr, g_wd), []).append(prm)
    return [{"params": v, "lr": k[0], "weight_decay": k[1]} for k, v in groups.items()]


class _KeyedBatches:
    """Adapts a per-step batch sampler to yield ``(index, step, slot)`` keys for ``TrainCrops``."""

    def __init__(self, sampler, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __iter__(self):
        for s in range(self.start, self.stop):
            yield [(i, s, k) for k, i in enumerate(self.sampler.batch(s))]

    def __len__(self):
        return self.stop - self.start


@dataclass
class TrainOutputs:
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    resumed_from: int = 0
    seconds: float = 0.0


def train(p: Params, dataset_dir: str | Path, split: dict, index: dict, ckpt_path: str | Path,
          on_log: Callable[[int, dict], None] | None = None, on_checkpoint: Callable[[Path], None] | None = None,
          label_root: str | Path | None = None,
          progress: bool = True) -> tuple[torch.nn.Module, TrainOutputs]:
    """Train (or resume from ``ckpt_path`` when it holds this config's checkpoint).

    ``split``/``index``: the prepare stage's split.json / index.json. ``label_root``: read
    training labels from there (pseudo labels) instead of ``dataset_dir``.
    """
    t = p.train
    device = resolve_device(t.device)
    if t.threads:
        torch.set_num_threads(t.threads)
    num_classes = split["num_classes"]
    torch.manual_seed(p.base.seed)
    model = build_model(p.model, num_classes, _backbone_state(p)).to(device)
    criterion = build_criterion(p, num_classes, split["base"], split["novel"]).to(device)
    opt = torch.optim.AdamW(param_groups(model, criterion, t.lr, t.weight_decay, t.backbone_lr_mult),
                            lr=t.lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / t.iterations) ** t.poly_power)
    phash = params_hash(p)
    out = TrainOutputs()
    start = 0
    ckpt_path = Path(ckpt_path)
    if ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        if ck.get("params_hash") == phash:
            model.load_state_dict(ck["model"])
            criterion.load_state_dict(ck["criterion"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            torch.set_rng_state(ck["rng_cpu"])
            if device.type == "cuda" and ck.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(ck["rng_cuda"])
            start = out.resumed_from = int(ck["step"])
            out.history = list(ck["history"])

    train_entries = index["train"]
    usable = [i for i, e in enumerate(train_entries) if e["usable"]]
    if not usable:
        raise ValueError("the training split has no usable images (index.json 'train' has none marked usable)")
    if t.pair_sampling:
        sampler = PairBatchSampler(index["class_to_images"], usable, t.batch_size, p.base.seed)
    else:
        sampler = RandomBatchSampler(usable, t.batch_size, p.base.seed)
    data = TrainCrops(dataset_dir, train_entries, p.data.crop_size, (p.data.scale_min, p.data.scale_max),
                      p.base.seed, label_root)
    loader = DataLoader(data, batch_sampler=_KeyedBatches(sampler, start, t.iterations), num_workers=t.workers,
                        collate_fn=collate_train, pin_memory=device.type == "cuda", worker_init_fn=worker_init,
                        persistent_workers=t.workers > 0, prefetch_factor=4 if t.workers > 0 else None)
    base_ids = torch.tensor(split["base"], dtype=torch.long, device=device)
    novel_ids = torch.tensor(split["novel"], dtype=torch.long, device=device)
    use_amp = t.amp and device.type == "cuda"

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "criterion": criterion.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "step": step, "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
            "params": to_dict(p), "params_hash": phash, "history": out.history, "num_classes": num_classes})
        if on_checkpoint is not None:
            on_checkpoint(ckpt_path)

    model.train()
    criterion.train()
    bar = tqdm(total=t.iterations, initial=start, disable=not progress, desc="train", unit="it", dynamic_ncols=True)
    t0 = time.perf_counter()
    window_t, window_n, running = time.perf_counter(), 0, {}
    step = start
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True).float()
        sem_seg = batch["sem_seg"].to(device, non_blocking=True)
        valid = batch["valid"].to(device, non_blocking=True)
        targets = weak_shot_targets(sem_seg, valid, base_ids, novel_ids, p.loss.oracle)
        # Point sampling draws from a CPU generator seeded per step: same points on any device, exact resume.
        gen = torch.Generator().manual_seed(p.base.seed * 1_000_003 + step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            outputs = model(images)
        losses = criterion(outputs, targets, gen)
        loss = criterion.total(losses)
        for name, value in losses.items():
            if not torch.isfinite(value):
                raise NonFiniteLossError(f"non-finite loss at step {step}: {name} = {value.item()} "
                                         f"(last good checkpoint kept at '{ckpt_path}')")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], t.clip_grad_norm)
        opt.step()
        sched.step()
        step += 1
        window_n += images.shape[0]
        for k, v in losses.items():
            if not k[-1].isdigit():          # aux-layer terms stay out of the curve
                running[k] = running.get(k, 0.0) + v.item()
        running["loss"] = running.get("loss", 0.0) + loss.item()   # CPU-GPU sync point, once per step
        if step % t.log_interval == 0 or step == t.iterations:
            n = t.log_interval if step % t.log_interval == 0 else step % t.log_interval
            dt = time.perf_counter() - window_t
            rec = {"step": step, **{k: v / n for k, v in running.items()},
                   "lr": opt.param_groups[0]["lr"], "images_per_s": window_n / max(dt, 1e-9)}
            out.history.append(rec)
            if on_log is not None:
                on_log(step, rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", img_s=f"{rec['images_per_s']:.1f}")
            window_t, window_n, running = time.perf_counter(), 0, {}
        bar.update(1)
        if step % t.checkpoint_interval == 0 or step == t.iterations:
            checkpoint(step)
    bar.close()
    out.steps, out.seconds = step, time.perf_counter() - t0
    return model, out


def _backbone_state(p: Params):
    if p.model.pretrained == "none":
        return None
    from ..model.weights import load_backbone_state_dict
    return load_backbone_state_dict(p.model.pretrained, p.model.backbone)


def export_model(model: torch.nn.Module, p: Params, split: dict, path: str | Path) -> None:
    """The trained model as the evaluate stage reads it: weights, params and split."""
    save_checkpoint(path, {"model": model.state_dict(), "params": to_dict(p), "params_hash": params_hash(p),
                           "split": split, "num_classes": split["num_classes"]})


def curve_rows(history: list[dict]) -> list[dict]:
    return [{k: (v if not (isinstance(v, float) and math.isnan(v)) else "") for k, v in r.items()} for r in history]
