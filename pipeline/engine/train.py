"""The training loop: AdamW with a backbone lr multiplier, poly schedule, global gradient
clipping, bf16 autocast on CUDA, atomic checkpoints with RNG states, exact resume.

CUDA fast paths (``train.amp``, ``channels_last``, ``tf32``, ``fused_adamw``; see
:class:`FastPath`) apply on CUDA only and are no-ops on the CPU; ``train.compile`` applies
on any device. One training step is :func:`train_step`, shared with the benchmark
(``pipeline/engine/benchmark.py``), which times its phases through the ``mark`` hook.

Nothing here imports MLflow: the caller passes ``on_log(step, metrics)`` and
``on_checkpoint(path)`` callbacks.

Multi-process (DistributedDataParallel): when a process group is initialised (the train stage
under ``torchrun``, see ``distributed.py``), :func:`train` wraps the model in DDP, each rank
trains on its contiguous slice of the global batch of each step, the loss normalisers are
summed over the ranks, the criterion's SimNet gradients are averaged like DDP's, logged
metrics are means over the ranks, and rank 0 alone writes checkpoints. Differences to one
process with the same global batch, by design: the point samples of SimLoss / DistLoss (and
of a point-sampled MaskLoss) come from a per-rank stream (a function of seed, step and rank),
and BatchNorm (SimNet's; the backbone's unless ``model.freeze_bn``) normalises over the
rank's own samples (per-GPU BatchNorm, as usual under DDP).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import Params, TrainConfig, params_hash, to_dict
from ..data.dataset import TrainCrops, collate_train, worker_init
from ..data.sampler import PairBatchSampler, RandomBatchSampler
from ..data.targets import weak_shot_targets
from ..losses.criterion import SetCriterion
from ..losses.matcher import HungarianMatcher
from ..model import build_model
from ..io import remove_stale_temps
from . import distributed as D
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


@dataclass(frozen=True)
class FastPath:
    """The speed switches in effect for one run (``train.*`` resolved for the device)."""
    amp: bool = False            # bf16 autocast of the model forward
    channels_last: bool = False  # model weights and input images in channels_last
    tf32: bool = False           # TF32 matmuls / cuDNN convolutions
    fused_adamw: bool = False    # AdamW(fused=True)
    compile: bool = False        # torch.compile(model)

    @classmethod
    def resolve(cls, t: TrainConfig, device: torch.device) -> "FastPath":
        cuda = device.type == "cuda"
        return cls(amp=t.amp and cuda, channels_last=t.channels_last and cuda, tf32=t.tf32 and cuda,
                   fused_adamw=t.fused_adamw and cuda, compile=t.compile)

    @staticmethod
    def not_applied(t: TrainConfig, device: torch.device) -> list[str]:
        """The switches that are on in ``t`` but do not apply on ``device``."""
        if device.type == "cuda":
            return []
        return [k for k in ("amp", "channels_last", "tf32", "fused_adamw") if getattr(t, k)]


def apply_backend_flags(fast: FastPath, device: torch.device) -> None:
    """Set the process-wide TF32 switches to ``fast.tf32`` on CUDA (explicitly, both ways)."""
    if device.type != "cuda":
        return
    with warnings.catch_warnings():          # newer torch prefers fp32_precision; same effect
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = fast.tf32
        torch.backends.cudnn.allow_tf32 = fast.tf32


def prepare_model(model: torch.nn.Module, fast: FastPath) -> Callable:
    """Apply channels_last in place; return the callable that runs the forward pass (the
    compiled module when ``fast.compile``; ``model`` itself keeps the state_dict keys)."""
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
    return torch.compile(model) if fast.compile else model


def build_optimizer(p: Params, model: torch.nn.Module, criterion: torch.nn.Module,
                    fast: FastPath) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    t = p.train
    kw = {"fused": True} if fast.fused_adamw else {}
    opt = torch.optim.AdamW(param_groups(model, criterion, t.lr, t.weight_decay, t.backbone_lr_mult),
                            lr=t.lr, weight_decay=t.weight_decay, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / t.iterations) ** t.poly_power)
    return opt, sched


def build_train_loader(p: Params, dataset_dir: str | Path, index: dict, start: int, stop: int,
                       device: torch.device, label_root: str | Path | None = None,
                       rank: int = 0, world_size: int = 1) -> DataLoader:
    """The training DataLoader for steps ``start .. stop - 1``: pinned memory on CUDA,
    persistent workers with prefetching, OpenCV threads off in the workers. With
    ``world_size`` > 1, each step yields ``rank``'s contiguous slice of the global batch."""
    t = p.train
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
    # Own generator: iter(loader) would otherwise draw its base seed from the global RNG, which a
    # resumed run restores from the checkpoint just before - the dropout stream would shift (inexact resume).
    return DataLoader(data, batch_sampler=_KeyedBatches(sampler, start, stop, rank, world_size),
                      num_workers=t.workers,
                      collate_fn=collate_train, pin_memory=device.type == "cuda", worker_init_fn=worker_init,
                      persistent_workers=t.workers > 0, prefetch_factor=4 if t.workers > 0 else None,
                      generator=torch.Generator().manual_seed(p.base.seed))


def _no_mark(_: str) -> None:
    pass


def _float_outputs(x):
    """The model's outputs with every reduced-precision floating tensor cast to fp32."""
    if torch.is_tensor(x):
        return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x
    if isinstance(x, dict):
        return {k: _float_outputs(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_float_outputs(v) for v in x)
    return x


def train_step(forward: Callable, criterion: SetCriterion, opt: torch.optim.Optimizer, sched, batch: dict,
               p: Params, step: int, device: torch.device, fast: FastPath, base_ids: torch.Tensor,
               novel_ids: torch.Tensor, mark: Callable[[str], None] | None = None,
               nonfinite_hint: str = "", rank: int = 0, sync_grads: Callable[[], None] | None = None,
               all_finite: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """One optimisation step on ``batch``; returns (weighted total loss, named losses).

    ``mark(phase)`` is called at the end of each phase: ``transfer`` (host-to-device copy and
    targets), ``forward``, ``match_loss`` (matching and every loss), ``backward``, ``optimizer``.
    Multi-process: ``rank`` selects the point-sampling stream, ``sync_grads()`` runs after the
    backward pass (gradients DDP does not own), ``all_finite(flags)`` ANDs the finiteness flags
    over the ranks so that all of them stop together.
    """
    mark = mark or _no_mark
    images = batch["image"].to(device, non_blocking=True)
    images = images.to(dtype=torch.float32,
                       memory_format=torch.channels_last if fast.channels_last else torch.preserve_format)
    sem_seg = batch["sem_seg"].to(device, non_blocking=True)
    valid = batch["valid"].to(device, non_blocking=True)
    targets = weak_shot_targets(sem_seg, valid, base_ids, novel_ids, p.loss.oracle)
    # Point sampling draws from a CPU generator seeded per step: same points on any device, exact resume.
    seed = p.base.seed * 1_000_003 + step
    if rank:    # the other ranks of a multi-process run: their own stream, a function of (seed, step, rank)
        seed += rank << 48
    gen = torch.Generator().manual_seed(seed)
    mark("transfer")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast.amp):
        outputs = forward(images)
    if fast.amp:            # matching and losses run outside autocast, in fp32 (SimNet's weights are fp32)
        outputs = _float_outputs(outputs)
    mark("forward")
    losses = criterion(outputs, targets, gen)
    loss = criterion.total(losses)
    if losses:                                  # one CPU-GPU sync for the whole finiteness check
        names = list(losses)
        finite = torch.isfinite(torch.stack([v.detach().float() for v in losses.values()]))
        if all_finite is not None:
            finite = all_finite(finite)
        if not bool(finite.all()):
            name = names[int((~finite).nonzero()[0, 0])]
            where = "" if all_finite is None or not torch.isfinite(losses[name].detach()) else " (on another rank)"
            # step + 1: numbered like the training curve and checkpoints (steps done after this one)
            raise NonFiniteLossError(f"non-finite loss at step {step + 1}: {name} = {losses[name].item()}{where}"
                                     + nonfinite_hint)
    mark("match_loss")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if sync_grads is not None:
        sync_grads()
    mark("backward")
    if p.train.clip_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], p.train.clip_grad_norm)
    opt.step()
    sched.step()
    mark("optimizer")
    return loss, losses


class _KeyedBatches:
    """Adapts a per-step batch sampler to yield ``(index, step, slot)`` keys for ``TrainCrops``;
    with ``world_size`` > 1 only ``rank``'s contiguous slice of each global batch (slots stay
    global, so every image gets the augmentation it gets in a single process)."""

    def __init__(self, sampler, start: int, stop: int, rank: int = 0, world_size: int = 1):
        self.sampler, self.start, self.stop = sampler, start, stop
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        for s in range(self.start, self.stop):
            keys = [(i, s, k) for k, i in enumerate(self.sampler.batch(s))]
            if self.world_size > 1:
                per = len(keys) // self.world_size
                keys = keys[self.rank * per:(self.rank + 1) * per]
            yield keys

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

    In an initialised process group (see the module docstring) every rank calls this; pass
    ``on_log`` / ``on_checkpoint`` on rank 0 only.
    """
    t = p.train
    dist = D.current()
    multi = dist.distributed
    device = resolve_device(t.device)
    if multi:
        device = _rank_device(device, dist)
        from ..config import check_world_batch
        check_world_batch(p, dist.world_size, "the process group's world size")
    if t.threads:
        torch.set_num_threads(t.threads)
    num_classes = split["num_classes"]
    torch.manual_seed(p.base.seed)
    fast = FastPath.resolve(t, device)
    apply_backend_flags(fast, device)
    model = build_model(p.model, num_classes, _backbone_state(p)).to(device)
    criterion = build_criterion(p, num_classes, split["base"], split["novel"]).to(device)
    if multi:
        forward = _wrap_ddp(model, fast, device, p)
        criterion.normalizer = D.GlobalCount(dist.world_size)
        if dist.rank:       # dropout: ranks > 0 get their own stream (each restored on resume)
            torch.manual_seed(p.base.seed * 1_000_003 + (dist.rank << 48))
    else:
        forward = prepare_model(model, fast)
    opt, sched = build_optimizer(p, model, criterion, fast)
    phash = params_hash(p)
    out = TrainOutputs()
    start = 0
    ckpt_path = Path(ckpt_path)
    if not multi or dist.is_main:
        remove_stale_temps(ckpt_path)           # a checkpoint write cut short by SIGKILL
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
            if multi:
                _restore_rank_rng(ck, dist, device)
            start = out.resumed_from = int(ck["step"])
            out.history = list(ck["history"])
        else:
            warnings.warn(f"checkpoint '{ckpt_path}' belongs to other params (hash {ck.get('params_hash')}, "
                          f"now {phash}): starting from step 0 and overwriting it", stacklevel=2)

    if multi and len(set(starts := D.all_gather_object(start))) > 1:
        raise RuntimeError(f"the training processes would resume from different steps {starts}: the checkpoint "
                           f"'{ckpt_path}' must be the same file for every node (a shared filesystem)")
    loader = build_train_loader(p, dataset_dir, index, start, t.iterations, device, label_root,
                                dist.rank, dist.world_size)
    base_ids = torch.tensor(split["base"], dtype=torch.long, device=device)
    novel_ids = torch.tensor(split["novel"], dtype=torch.long, device=device)
    hint = f" (last good checkpoint kept at '{ckpt_path}')"

    def checkpoint(step: int) -> None:
        # A finite loss can still come with non-finite gradients: never overwrite the last good checkpoint
        # with poisoned weights (one check per checkpoint, not per step).
        if (bad := _first_nonfinite(model, criterion)) is not None:
            raise NonFiniteLossError(f"non-finite weights after step {step}: {bad} (non-finite gradients?); "
                                     f"checkpoint not written" + hint)
        extra = {}
        if multi:   # every rank's RNG states, so that each resumes its own dropout stream
            rngs = D.all_gather_object((torch.get_rng_state(),
                                        torch.cuda.get_rng_state() if device.type == "cuda" else None))
            extra = {"world_size": dist.world_size, "rng_cpu_ranks": [r[0] for r in rngs],
                     "rng_cuda_ranks": [r[1] for r in rngs]}
        if not multi or dist.is_main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "criterion": criterion.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": step, "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                "params": to_dict(p), "params_hash": phash, "history": out.history, "num_classes": num_classes,
                **extra})
            if on_checkpoint is not None:
                on_checkpoint(ckpt_path)
        if multi:
            D.barrier()     # no rank runs ahead of (or reads) a checkpoint still being written

    model.train()
    criterion.train()
    bar = tqdm(total=t.iterations, initial=start, disable=not progress or not dist.is_main, desc="train", unit="it",
               dynamic_ncols=True)
    step_kw = {}
    if multi:
        crit_params = [q for q in criterion.parameters() if q.requires_grad]
        step_kw = {"rank": dist.rank, "all_finite": D.all_true,
                   "sync_grads": (lambda: D.average_gradients(crit_params)) if crit_params else None}
    t0 = time.perf_counter()
    window_t, window_n, running = time.perf_counter(), 0, {}
    step = start
    for batch in loader:
        try:
            loss, losses = train_step(forward, criterion, opt, sched, batch, p, step, device, fast,
                                      base_ids, novel_ids, nonfinite_hint=hint, **step_kw)
        except (ValueError, RuntimeError) as e:   # e.g. the matcher on NaN logits: say why, on failure only
            if isinstance(e, NonFiniteLossError) or (bad := _first_nonfinite(model, criterion)) is None:
                raise
            raise NonFiniteLossError(f"non-finite weights at step {step + 1}: {bad} (non-finite gradients at an "
                                     f"earlier step?); {type(e).__name__}: {e}" + hint) from e
        step += 1
        window_n += batch["image"].shape[0]
        # Running sums stay on the device (float64); read back once per log interval.
        for k, v in losses.items():
            if not k[-1].isdigit():          # aux-layer terms stay out of the curve
                running[k] = running.get(k, 0.0) + v.detach().double()
        running["loss"] = running.get("loss", 0.0) + loss.detach().double()
        if step % t.log_interval == 0 or step == t.iterations:
            n = t.log_interval if step % t.log_interval == 0 else step % t.log_interval
            if multi:       # means over the ranks (each rank's losses are its share of the global batch's)
                running = D.all_reduce_mean(running)
            running = {k: float(v) for k, v in running.items()}      # the CPU-GPU sync point
            dt = time.perf_counter() - window_t
            rec = {"step": step, **{k: v / n for k, v in running.items()},
                   "lr": opt.param_groups[0]["lr"], "images_per_s": window_n * dist.world_size / max(dt, 1e-9)}
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


def _rank_device(device: torch.device, dist: D.DistInfo) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` on CUDA (made the current device), else ``device``."""
    if device.type != "cuda":
        return device
    dev = torch.device("cuda", dist.local_rank)
    torch.cuda.set_device(dev)
    return dev


def _wrap_ddp(model: torch.nn.Module, fast: FastPath, device: torch.device, p: Params) -> Callable:
    """``model`` (channels_last applied in place) in DistributedDataParallel, compiled when
    ``fast.compile``. Every parameter takes part in the loss unless a whole family of losses is
    switched off; only then does DDP search the graph for unused ones (slower)."""
    from dataclasses import replace

    from torch.nn.parallel import DistributedDataParallel
    prepare_model(model, replace(fast, compile=False))
    lc = p.loss
    no_mask_loss = lc.focal_weight == 0 and lc.dice_weight == 0 and lc.comp_weight == 0 and lc.pp_weight == 0
    no_class_loss = lc.cls_weight == 0 and lc.pp_weight == 0
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=no_mask_loss or no_class_loss)
    return torch.compile(ddp) if fast.compile else ddp


def _restore_rank_rng(ck: dict, dist: D.DistInfo, device: torch.device) -> None:
    """This rank's RNG states from a multi-process checkpoint of the same world size; otherwise
    (another number of processes) ranks > 0 take their fresh per-rank seed."""
    cpu, cuda = ck.get("rng_cpu_ranks"), ck.get("rng_cuda_ranks")
    if cpu is not None and len(cpu) == dist.world_size:
        torch.set_rng_state(cpu[dist.rank])
        if device.type == "cuda" and cuda is not None and cuda[dist.rank] is not None:
            torch.cuda.set_rng_state(cuda[dist.rank])
    elif dist.rank:
        p_seed = int(ck["params"]["base"]["seed"])
        torch.manual_seed(p_seed * 1_000_003 + (dist.rank << 48) + int(ck["step"]))


def _first_nonfinite(*modules: torch.nn.Module) -> str | None:
    """Name of the first floating tensor of ``modules``' state that holds NaN or inf, else None."""
    for m in modules:
        for name, v in m.state_dict().items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return name
    return None


def _backbone_state(p: Params):
    if p.model.pretrained == "none":
        return None
    from ..model.weights import load_backbone_state_dict
    return load_backbone_state_dict(p.model.pretrained, p.model.backbone)


def export_model(model: torch.nn.Module, p: Params, split: dict, path: str | Path,
                 history: list[dict] | None = None) -> None:
    """The trained model as the evaluate stage reads it: weights, params, split and training curve."""
    save_checkpoint(path, {"model": model.state_dict(), "params": to_dict(p), "params_hash": params_hash(p),
                           "split": split, "num_classes": split["num_classes"], "history": history or []})
