"""The training loop: AdamW with a backbone lr multiplier, poly schedule, global gradient
clipping, bf16 autocast on CUDA, atomic checkpoints with RNG states, exact resume.

:func:`build_training` makes everything a run trains with (a :class:`Training`: the
checkpointable :class:`~pipeline.engine.checkpoint.TrainState` plus the forward callable and
device settings); :func:`train_step` is one optimisation step; :func:`train` is the loop. The
benchmark (``pipeline/engine/benchmark.py``) builds and steps the same way and times the
phases of a step through the ``mark`` hook.

CUDA fast paths (``train.amp``, ``channels_last``, ``tf32``, ``fused_adamw``; see
:class:`FastPath`) apply on CUDA only and are no-ops on the CPU; ``train.compile`` applies
on any device. Nothing here imports MLflow: the caller passes ``on_log(step, record)`` and
``on_checkpoint(path, step)`` callbacks.

Multi-process (DistributedDataParallel; the details live in ``distributed.py`` and are no-ops
in a single process): the model is wrapped in DDP, each rank trains on its contiguous slice of
the global batch, the loss normalisers are summed over the ranks, the criterion's SimNet
gradients are averaged like DDP's, logged metrics are means over the ranks, and rank 0 alone
writes checkpoints. Differences to one process with the same global batch, by design: the
point samples of SimLoss / DistLoss (and of a point-sampled MaskLoss) come from a per-rank
stream (:func:`step_seed`), and BatchNorm normalises over the rank's own samples.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import Params, TrainConfig, check_world_batch, params_hash, to_dict
from ..data.dataset import TrainCrops, collate_train, worker_init
from ..data.sampler import PairBatchSampler, RandomBatchSampler
from ..data.targets import weak_shot_targets
from ..io import remove_stale_temps
from ..losses.build import build_criterion, leaves_parameters_unused
from ..model import build_model
from . import distributed as D
from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .device import resolve_device


class NonFiniteLossError(RuntimeError):
    pass


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of step ``step`` on ``rank``: the point sampling of that step, and the dropout
    stream of a rank > 0 starting (or resuming without its saved state) at that step."""
    return seed * 1_000_003 + step + (rank << 48)


# ============================================================================ the loop
def train(p: Params, dataset_dir: str | Path, split: dict, index: dict, ckpt_path: str | Path,
          on_log: Callable[[int, dict], None] | None = None,
          on_checkpoint: Callable[[Path, int], None] | None = None,
          label_root: str | Path | None = None, progress: bool = True,
          diagnostics: Callable[[TrainState, dict], dict] | None = None,
          init: dict | None = None) -> tuple[torch.nn.Module, TrainOutputs]:
    """Train (or resume from ``ckpt_path`` when it holds this config's checkpoint).

    ``split``/``index``: the prepare stage's split.json / index.json. ``label_root``: read
    training labels from there (pseudo labels) instead of ``dataset_dir``.
    ``diagnostics(state, batch)``: called at every log step with the state after the step and
    that step's batch; its metrics join the logged record (curve, MLflow). It runs on a fork of
    the RNG streams, so it never changes the training; it must leave weights, BatchNorm
    statistics and optimizer state as it found them.

    ``init``: the pretrain stage's output (``model.pretrained: weak_shot``): backbone and pixel
    decoder weights every run of the grid starts from.

    ``on_checkpoint(path, step)``: called after each checkpoint is written (``path``, after
    ``step`` steps), e.g. to copy it elsewhere (:func:`pipeline.tracking.training_callbacks`).

    In a process group every rank calls this; pass ``on_log`` / ``on_checkpoint`` on rank 0 only.
    """
    t, dist = p.train, D.current()
    if p.model.pretrained == "weak_shot" and not (init or {}).get("used"):
        raise ValueError("model.pretrained is 'weak_shot' but no weak-shot initialisation was given: run the "
                         "pretrain stage first (dvc repro) and pass its output with --init")
    device = D.rank_device(resolve_device(t.device))
    if dist.distributed:
        check_world_batch(p, dist.world_size, "the process group's world size")
    if t.threads:
        torch.set_num_threads(t.threads)
    tr = build_training(p, split, device, FastPath.resolve(t, device), init)
    state, ckpt_path = tr.state, Path(ckpt_path)
    meta = {"params": to_dict(p), "params_hash": params_hash(p), "num_classes": split["num_classes"]}
    resumed_from = _resume(state, ckpt_path, meta["params_hash"], p.base.seed, device)
    loader = build_train_loader(p, dataset_dir, index, state.step, t.iterations, device, label_root,
                                dist.rank, dist.world_size)
    hint = f" (last good checkpoint kept at '{ckpt_path}')"
    bar = tqdm(total=t.iterations, initial=state.step, disable=not progress or not dist.is_main, desc="train",
               unit="it", dynamic_ncols=True)
    state.model.train()
    state.criterion.train()
    # ``seconds`` in the curve is the run's training time: a resumed run goes on from the
    # checkpoint's last record (the time lost between that record and a kill is not counted)
    elapsed = float(state.history[-1].get("seconds") or 0.0) if state.history else 0.0
    t0, window = time.perf_counter(), _LossWindow(dist.world_size)
    for batch in loader:
        try:
            loss, losses = train_step(tr, batch, hint=hint)
        except (ValueError, RuntimeError) as e:   # e.g. the matcher on NaN logits: say why, on failure only
            _raise_if_poisoned(state, e, hint)
            raise
        window.add(loss, losses, batch["image"].shape[0])
        if state.step % t.log_interval == 0 or state.step == t.iterations:
            means, images_per_s = window.flush()                    # the CPU-GPU sync point
            rec = {"step": state.step, **means, "lr": state.optimizer.param_groups[0]["lr"],
                   "images_per_s": images_per_s, "seconds": elapsed + time.perf_counter() - t0}
            if diagnostics is not None:          # per-log-interval diagnostics join the record
                rec.update(_diagnose(diagnostics, state, batch, device))
            state.history.append(rec)
            if on_log is not None:
                on_log(state.step, rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", img_s=f"{rec['images_per_s']:.1f}")
            window.restart()                     # logging time stays out of images/s
        bar.update(1)
        if state.step % t.checkpoint_interval == 0 or state.step == t.iterations:
            _checkpoint(state, ckpt_path, meta, device, hint, on_checkpoint)
    bar.close()
    return state.model, TrainOutputs(state.history, state.step, resumed_from, time.perf_counter() - t0,
                                     state.criterion)


@dataclass
class TrainOutputs:
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    resumed_from: int = 0
    seconds: float = 0.0
    criterion: torch.nn.Module | None = None        # the trained criterion (its SimNet: held-out diagnostics)

    @property
    def simnet(self) -> torch.nn.Module | None:
        """The trained SimNet, or None when the run had neither SimLoss nor DistLoss."""
        return getattr(getattr(self.criterion, "similarity", None), "simnet", None)


# ============================================================================ one step
@dataclass
class Training:
    """What a run trains with (:func:`build_training`): the checkpointable state, the callable
    that runs the forward pass (the model, or its DDP / compiled wrapper), and the settings a
    step needs."""
    p: Params
    device: torch.device
    fast: FastPath
    state: TrainState
    forward: Callable
    base_ids: torch.Tensor
    novel_ids: torch.Tensor
    rank: int = 0
    shared_params: list[torch.Tensor] = field(default_factory=list)    # criterion params DDP does not own


def build_training(p: Params, split: dict, device: torch.device, fast: FastPath,
                   init: dict | None = None) -> Training:
    """Model, criterion, AdamW and poly schedule of a fresh run, seeded with ``base.seed``; in a
    process group, the model in DDP, the loss normalisers global and a dropout stream per rank.
    ``init``: the weak-shot initialisation (see :func:`train`); without it, ``model.pretrained:
    weak_shot`` starts from random weights (the benchmark, which times steps only)."""
    dist = D.current()
    torch.manual_seed(p.base.seed)
    apply_backend_flags(fast, device)
    if p.model.pretrained == "weak_shot":
        used = (init or {}).get("used")
        model = build_model(p.model, split["num_classes"], init["backbone"] if used else None,
                            init["pixel_decoder"] if used else None).to(device)
    else:
        model = build_model(p.model, split["num_classes"], _backbone_state(p)).to(device)
    if p.train.freeze in ("backbone", "encoder"):      # no gradient is computed for frozen parts
        model.backbone.requires_grad_(False)
    if p.train.freeze == "encoder":
        model.pixel_decoder.requires_grad_(False)
    criterion = build_criterion(p, split["num_classes"], split["base"], split["novel"]).to(device)
    wrap = partial(D.wrap_model, device=device, find_unused=leaves_parameters_unused(p)) if dist.distributed else None
    forward = prepare_model(model, fast, wrap)
    if dist.distributed:
        criterion.normalizer = D.GlobalCount(dist.world_size)
        if dist.rank:       # dropout: ranks > 0 get their own stream (each restored on resume)
            torch.manual_seed(step_seed(p.base.seed, 0, dist.rank))
    opt, sched = build_optimizer(p, model, criterion, fast)
    ids = {k: torch.tensor(split[k], dtype=torch.long, device=device) for k in ("base", "novel")}
    return Training(p, device, fast, TrainState(model, criterion, opt, sched), forward, ids["base"], ids["novel"],
                    dist.rank, [q for q in criterion.parameters() if q.requires_grad])


def train_step(tr: Training, batch: dict, mark: Callable[[str], None] | None = None,
               hint: str = "") -> tuple[torch.Tensor, dict]:
    """One optimisation step on ``batch`` (advances ``tr.state.step``); returns (weighted total
    loss, named losses). ``mark(phase)`` is called at the end of each phase: ``transfer``
    (host-to-device copy and targets), ``forward``, ``match_loss`` (matching and every loss),
    ``backward``, ``optimizer``. ``hint`` ends the message of a non-finite loss."""
    mark = mark or _no_mark
    p, device, state = tr.p, tr.device, tr.state
    images = batch["image"].to(device, non_blocking=True)
    images = images.to(dtype=torch.float32,
                       memory_format=torch.channels_last if tr.fast.channels_last else torch.preserve_format)
    sem_seg = batch["sem_seg"].to(device, non_blocking=True)
    valid = batch["valid"].to(device, non_blocking=True)
    targets = weak_shot_targets(sem_seg, valid, tr.base_ids, tr.novel_ids, p.loss.oracle)
    # Point sampling draws from a CPU generator seeded per step: same points on any device, exact resume.
    gen = torch.Generator().manual_seed(step_seed(p.base.seed, state.step, tr.rank))
    mark("transfer")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tr.fast.amp):
        outputs = tr.forward(images)
    if tr.fast.amp:            # matching and losses run outside autocast, in fp32 (SimNet's weights are fp32)
        outputs = _float_outputs(outputs)
    mark("forward")
    losses = state.criterion(outputs, targets, gen, step=state.step)
    loss = state.criterion.total(losses)
    _check_finite(losses, state.step, hint)
    mark("match_loss")
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    D.average_gradients(tr.shared_params)       # SimNet's gradients, averaged over the ranks like DDP's
    mark("backward")
    if p.train.clip_grad_norm > 0:
        params = [q for g in state.optimizer.param_groups for q in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, p.train.clip_grad_norm)
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    mark("optimizer")
    return loss, losses


def _check_finite(losses: dict, step: int, hint: str) -> None:
    """Raise when a loss is NaN / inf on any rank (so that all ranks stop together)."""
    if not losses:
        return
    names = list(losses)        # one CPU-GPU sync for the whole check
    finite = D.all_true(torch.isfinite(torch.stack([v.detach().float() for v in losses.values()])))
    if bool(finite.all()):
        return
    name = names[int((~finite).nonzero()[0, 0])]
    where = " (on another rank)" if torch.isfinite(losses[name].detach()) else ""
    # step + 1: numbered like the training curve and checkpoints (steps done after this one)
    raise NonFiniteLossError(f"non-finite loss at step {step + 1}: {name} = {losses[name].item()}{where}" + hint)


# ============================================================================ building blocks
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


def build_optimizer(p: Params, model: torch.nn.Module, criterion: torch.nn.Module,
                    fast: FastPath) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    t = p.train
    kw = {"fused": True} if fast.fused_adamw else {}
    opt = torch.optim.AdamW(param_groups(model, criterion, t.lr, t.weight_decay, t.backbone_lr_mult),
                            lr=t.lr, weight_decay=t.weight_decay, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (t.warmup + 1)) * max(0.0, 1 - s / t.iterations) ** t.poly_power)
    return opt, sched


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


def prepare_model(model: torch.nn.Module, fast: FastPath, wrap: Callable | None = None) -> Callable:
    """Apply channels_last in place; return the callable that runs the forward pass: ``model``
    (which keeps the state_dict keys), ``wrap(model)`` (DDP) when given, compiled when
    ``fast.compile``."""
    if fast.channels_last:
        model.to(memory_format=torch.channels_last)
    forward = wrap(model) if wrap is not None else model
    return torch.compile(forward) if fast.compile else forward


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
                      p.base.seed, label_root, p.data.photometric)
    # Own generator: iter(loader) would otherwise draw its base seed from the global RNG, which a
    # resumed run restores from the checkpoint just before - the dropout stream would shift (inexact resume).
    return DataLoader(data, batch_sampler=_KeyedBatches(sampler, start, stop, rank, world_size),
                      num_workers=t.workers,
                      collate_fn=collate_train, pin_memory=device.type == "cuda", worker_init_fn=worker_init,
                      persistent_workers=t.workers > 0, prefetch_factor=4 if t.workers > 0 else None,
                      generator=torch.Generator().manual_seed(p.base.seed))


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


# ============================================================================ loop helpers
class _LossWindow:
    """The logged losses of one log interval: running sums on the device (float64), read back
    once per interval; means over the ranks in a process group."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.sums: dict = {}
        self.steps = self.images = 0
        self.restart()

    def restart(self) -> None:
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, losses: dict, images: int) -> None:
        for k, v in losses.items():
            if not k[-1].isdigit():          # aux-layer terms stay out of the curve
                self.sums[k] = self.sums.get(k, 0.0) + v.detach().double()
        self.sums["loss"] = self.sums.get("loss", 0.0) + loss.detach().double()
        self.steps += 1
        self.images += images

    def flush(self) -> tuple[dict, float]:
        """(mean of each loss over the interval's steps, images/s of all ranks); empties the window."""
        sums = D.all_reduce_mean(self.sums) if self.world_size > 1 else self.sums
        means = {k: float(v) / self.steps for k, v in sums.items()}
        images_per_s = self.images * self.world_size / max(time.perf_counter() - self.t0, 1e-9)
        self.sums, self.steps, self.images = {}, 0, 0
        return means, images_per_s


def _resume(state: TrainState, path: Path, phash: str, seed: int, device: torch.device) -> int:
    """Load ``path`` into ``state`` when it holds this config's checkpoint; returns the step
    resumed from (0 for a fresh start)."""
    dist = D.current()
    if dist.is_main:
        remove_stale_temps(path)           # a checkpoint write cut short by SIGKILL
    if path.is_file():
        ck = load_checkpoint(path)
        if ck.get("params_hash") == phash:
            state.load_state_dict(ck)
            if not D.restore_rank_rng(ck, device) and dist.rank:    # saved by another number of processes
                torch.manual_seed(step_seed(seed, state.step, dist.rank))
        else:
            warnings.warn(f"checkpoint '{path}' belongs to other params (hash {ck.get('params_hash')}, "
                          f"now {phash}): starting from step 0 and overwriting it", stacklevel=3)
    if len(set(starts := D.all_gather_object(state.step))) > 1:
        raise RuntimeError(f"the training processes would resume from different steps {starts}: the checkpoint "
                           f"'{path}' must be the same file for every node (a shared filesystem)")
    return state.step


def _checkpoint(state: TrainState, path: Path, meta: dict, device: torch.device, hint: str,
                on_checkpoint: Callable[[Path, int], None] | None) -> None:
    # A finite loss can still come with non-finite gradients: never overwrite the last good checkpoint
    # with poisoned weights (one check per checkpoint, not per step).
    if (bad := _first_nonfinite(state.model, state.criterion)) is not None:
        raise NonFiniteLossError(f"non-finite weights after step {state.step}: {bad} (non-finite gradients?); "
                                 f"checkpoint not written" + hint)
    ranks = D.rank_rng_states(device)     # every rank's RNG states (a collective), so each resumes its dropout
    if D.current().is_main:
        state.save(path, **meta, **ranks)
        if on_checkpoint is not None:
            on_checkpoint(path, state.step)
    D.barrier()     # no rank runs ahead of (or reads) a checkpoint still being written


def _raise_if_poisoned(state: TrainState, e: Exception, hint: str) -> None:
    """Turn a step's error into a NonFiniteLossError naming the poisoned weight, when there is one."""
    if isinstance(e, NonFiniteLossError) or (bad := _first_nonfinite(state.model, state.criterion)) is None:
        return
    raise NonFiniteLossError(f"non-finite weights at step {state.step + 1}: {bad} (non-finite gradients at an "
                             f"earlier step?); {type(e).__name__}: {e}" + hint) from e


def _diagnose(fn: Callable[[TrainState, dict], dict], state: TrainState, batch: dict, device: torch.device) -> dict:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        out = dict(fn(state, batch))
    state.model.train()
    state.criterion.train()
    return out


def _first_nonfinite(*modules: torch.nn.Module) -> str | None:
    """Name of the first floating tensor of ``modules``' state that holds NaN or inf, else None."""
    for m in modules:
        for name, v in m.state_dict().items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return name
    return None


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


def _backbone_state(p: Params):
    if p.model.pretrained in ("none", "weak_shot"):
        return None
    from ..model.weights import load_backbone_state_dict
    return load_backbone_state_dict(p.model.pretrained, p.model.backbone)


def curve_table(history: list[dict]) -> list[dict]:
    """The training curve as the train stage writes it (``reports/train_curve.csv``): ``step``, every
    loss term of the criterion (blank when the params turn it off, so that the DVC plot of the
    terms finds each column in every revision), then the record's other columns."""
    from ..losses.criterion import TERMS
    head = ["step", *TERMS, "loss"]
    return [{**{k: rec.get(k) for k in head}, **rec} for rec in history]


def export_model(model: torch.nn.Module, p: Params, split: dict, path: str | Path,
                 history: list[dict] | None = None, simnet: torch.nn.Module | None = None) -> None:
    """The trained model as the evaluate stage reads it: weights, params, split and training curve;
    and the trained SimNet when given (``simnet``: read back by
    :func:`pipeline.engine.heldout.load_simnet` for the held-out similarity diagnostics of a grid cell
    that reuses this model; inference never uses it)."""
    extra = {"simnet": simnet.state_dict()} if simnet is not None else {}
    save_checkpoint(path, {"model": model.state_dict(), "params": to_dict(p), "params_hash": params_hash(p),
                           "split": split, "num_classes": split["num_classes"], "history": history or [], **extra})
