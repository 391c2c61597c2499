"""Typed configuration built from a params mapping (the parsed ``params.yaml``).

Every params group is a frozen dataclass whose fields hold a key's type, allowed values or
range and help text, never its value: ``params.yaml`` is the only place a value lives, and
:func:`build_params` requires every key. It validates a whole mapping: missing keys, unknown
keys (with a did-you-mean hint), wrong types, values out of range and values not in an
allowed set each raise :class:`ConfigError` naming the dotted key and what was expected.
Nothing here reads a file: stages load YAML and pass the mapping in.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

DATASETS = ("synthetic", "ade20k", "coco_stuff_10k")
# Official split ids per dataset; the synthetic dataset ships its own 4 splits.
SPLIT_IDS = {"synthetic": (1, 2, 3, 4), "ade20k": (1, 2, 3, 4), "coco_stuff_10k": tuple(range(1, 10))}
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
DEVICES = ("auto", "cpu", "cuda")
PP_FORMS = ("cce", "ce")
PP_PAIRINGS = ("cross_image", "within_image")
# DistLoss's teacher (pipeline.losses.similarity.DIST_TEACHERS): SimNet (the paper) or the oracle headroom
# control (the true same-class relation of the sampled pixel pairs, novel masks included: a diagnostic)
PP_TEACHERS = ("simnet", "oracle")
DIST_BACKENDS = ("auto", "nccl", "gloo")
FREEZE = ("none", "backbone", "encoder")
TRANSFORMER_IN = ("res5", "pixel_embedding")
EXECUTORS = ("local", "slurm")
# train.* keys that only say how a run is launched (processes, nodes, rendezvous): they are
# left out of params_hash, so a checkpoint resumes on another number of GPUs or from any node
# (the global batch, and with it the model, does not depend on them).
LAUNCH_KEYS = ("nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port", "dist_backend")
# train.* keys left out of params_hash besides the launch keys: how many checkpoints MLflow keeps
# changes no trained bit, so changing it neither restarts a training nor splits its MLflow run.
NOT_HASHED = (*LAUNCH_KEYS, "mlflow_checkpoints")
# Top-level params groups that are not part of :class:`Params` (the training's params): the
# ablation grid (:class:`AblationConfig`, :func:`build_ablation`).
EXTRA_TOP_LEVEL: tuple[str, ...] = ("ablation",)


class ConfigError(ValueError):
    """A params value is missing, misspelt, of the wrong type or out of range."""


def _spec(*, choices=None, lo=None, hi=None, lo_open=False, empty_ok=False, help: str = ""):
    """A params key: its allowed values or range and its help text. No default: the value
    comes from the params file (params.yaml is the only place a value lives). ``empty_ok``: a
    list key that may be ``[]``."""
    return field(metadata={"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "empty_ok": empty_ok,
                           "help": help})


@dataclass(frozen=True)
class BaseConfig:
    seed: int = _spec(lo=0, help="global seed: data generation, sampling, init, augmentation")


@dataclass(frozen=True)
class SyntheticConfig:
    num_train: int = _spec(lo=4, help="training images generated")
    num_test: int = _spec(lo=2, help="test images generated")
    image_size: int = _spec(lo=32, hi=1024, help="side of the square generated images")
    jitter: float = _spec(lo=0.0, hi=1.0, help="nuisance variation (colour, brightness, texture period / angle, "
                                               "illumination, noise); 1 = the hardest")
    cooccur: float = _spec(lo=0.0, hi=1.0, help="share of scene images: classes of a fixed scene group co-occur (two "
                                                "novel classes of every split per group) beside unlabelled clutter, "
                                                "with wide, clutter-like colours; 0 = independent classes (the "
                                                "default data, bit-identical)")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _spec(choices=DATASETS, help="which dataset to download and prepare")
    split: int = _spec(lo=1, help="official weak-shot split id (synthetic 1-4, ade20k 1-4, coco_stuff_10k 1-9)")
    crop_size: int = _spec(lo=16, help="square training crop")
    scale_min: float = _spec(lo=0.0, lo_open=True, help="random short-edge resize, lower factor of crop_size")
    scale_max: float = _spec(lo=0.0, lo_open=True, help="random short-edge resize, upper factor of crop_size")
    photometric: bool = _spec(help="random brightness / contrast / saturation / hue jitter of training crops")
    test_short_edge: int = _spec(lo=0, help="test-time short-edge resize (0 keeps the image size)")
    test_max_edge: int = _spec(lo=0, help="test-time cap on the long edge (0 = no cap)")
    url: str = _spec(help="archive URL override (a mirror); empty = the official URL")
    checksum: str = _spec(help="'md5:<hex>' or 'sha256:<hex>' override; empty = the pinned checksum")
    archive_dir: str = _spec(help="folder that already holds the official archive; empty = the stage's raw folder")
    prepare_workers: int = _spec(lo=1, help="parallel workers converting real-dataset labels")
    synthetic: SyntheticConfig = _spec(help="the generated dataset (data.dataset: synthetic)")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = _spec(choices=BACKBONES, help="ResNet depth of the backbone (paper resnet50)")
    pretrained: str = _spec(help="'weak_shot' (backbone + pixel decoder from the pretrain stage), 'imagenet', "
                                 "'none' or a path to a torchvision ResNet state dict")
    freeze_bn: bool = _spec(help="frozen BatchNorm (paper, with ImageNet init); train BN from scratch otherwise")
    hidden_dim: int = _spec(lo=8, help="transformer width d (paper 256)")
    num_queries: int = _spec(lo=1, help="learned queries (paper 100)")
    nheads: int = _spec(lo=1, help="attention heads (paper 8)")
    dec_layers: int = _spec(lo=1, help="transformer decoder layers (paper 6)")
    transformer_in: str = _spec(choices=TRANSFORMER_IN, help="what the queries attend to: res5 (paper) or "
                                "pixel_embedding (the stride-4 mask features, MaskFormer's alternative)")
    dim_feedforward: int = _spec(lo=8, help="FFN width (paper 2048)")
    dropout: float = _spec(lo=0.0, hi=1.0, help="dropout in the transformer decoder")
    conv_dim: int = _spec(lo=8, help="FPN pixel decoder channels (paper 256)")
    mask_dim: int = _spec(lo=8, help="mask feature / mask embedding channels (paper 256)")
    gn_groups: int = _spec(lo=1, help="GroupNorm groups in the pixel decoder")


@dataclass(frozen=True)
class LossConfig:
    # Matching costs (Hungarian): base = -class * p(class) + focal * focal cost + dice * dice cost;
    # novel = -class * p(class)
    match_class_cost: float = _spec(lo=0.0, help="matching cost weight of -p(class)")
    match_focal_cost: float = _spec(lo=0.0, help="matching cost weight of the sigmoid focal mask cost (base)")
    match_dice_cost: float = _spec(lo=0.0, help="matching cost weight of the dice mask cost (base)")
    # ClsLoss and MaskLoss
    cls_weight: float = _spec(lo=0.0, help="ClsLoss weight")
    no_object_weight: float = _spec(lo=0.0, help="class weight of the no-object label in ClsLoss")
    focal_weight: float = _spec(lo=0.0, help="MaskLoss / CompLoss sigmoid focal weight")
    dice_weight: float = _spec(lo=0.0, help="MaskLoss / CompLoss dice weight")
    focal_alpha: float = _spec(lo=0.0, hi=1.0, help="sigmoid focal loss alpha")
    focal_gamma: float = _spec(lo=0.0, help="sigmoid focal loss gamma")
    deep_supervision: bool = _spec(help="losses 2-4 on every decoder layer")
    mask_points: int = _spec(lo=0, help="point-sampled MaskLoss with this many points (0 = dense)")
    # CompLoss (complementary)
    comp_weight: float = _spec(lo=0.0, help="complementary loss weight (0.15 COCO, 0.2 ADE); 0 = off")
    comp_bg_logit: float = _spec(help="constant background logit in the complementary max")
    # SimLoss (SimNet on base pixel pairs)
    sim_weight: float = _spec(lo=0.0, help="SimLoss weight; 0 = off")
    sim_points: int = _spec(lo=2, help="pixels sampled per image for SimLoss")
    sim_base_points: int = _spec(lo=0, help="of sim_points, how many from a base class shared by the pair")
    # DistLoss (pixel-pixel distillation onto novel score maps)
    pp_weight: float = _spec(lo=0.0, help="DistLoss weight (0.5 ADE, 0.1 COCO); 0 = off")
    pp_form: str = _spec(choices=PP_FORMS, help="DistLoss form: cce (complementary cross-entropy) or ce")
    pp_points: int = _spec(lo=2, help="pixels sampled per image for DistLoss")
    pp_start: int = _spec(lo=0, help="training step from which DistLoss is on: a warm-up while SimNet learns "
                                     "from base pairs (paper 0)")
    pp_teacher: str = _spec(choices=PP_TEACHERS,
                            help="DistLoss teacher: simnet (the paper) or oracle (a headroom control that uses novel "
                                 "masks: the true same-class relation of the sampled pixel pairs; pairs with an "
                                 "ignore pixel left out). DistLoss off is pp_weight: 0")
    pp_pairing: str = _spec(choices=PP_PAIRINGS,
                            help="cross_image: student pairs across the image pair; within_image: within one image "
                                 "(the released code)")
    simnet_block_convs: int = _spec(lo=1, hi=2, help="linear + BatchNorm layers per SimNet residual block: 1 (the "
                                                     "paper's text) or 2 (the released code)")
    oracle: bool = _spec(help="fully supervised oracle: novel classes get their masks too (upper bound)")


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = _spec(lo=1, help="training steps")
    batch_size: int = _spec(lo=1, help="images per step (pairs: must be even when pair_sampling is on)")
    lr: float = _spec(lo=0.0, lo_open=True, help="AdamW learning rate (paper 1e-4)")
    weight_decay: float = _spec(lo=0.0, help="AdamW weight decay (none on norms, biases, embeddings)")
    backbone_lr_mult: float = _spec(lo=0.0, help="backbone lr multiplier (paper 0.1 with ImageNet init)")
    freeze: str = _spec(choices=FREEZE, help="parts not trained: none (paper), backbone, or encoder (backbone + "
                                             "pixel decoder, after the weak-shot initialisation)")
    warmup: int = _spec(lo=0, help="linear learning-rate warm-up steps before the poly schedule (paper 0)")
    poly_power: float = _spec(lo=0.0, help="poly learning-rate schedule: lr * (1 - step / iterations) ** power")
    clip_grad_norm: float = _spec(lo=0.0, help="global L2 gradient clip; 0 = off")
    device: str = _spec(choices=DEVICES, help="auto = cuda when available, else cpu")
    amp: bool = _spec(help="mixed precision (bf16) when on CUDA")
    channels_last: bool = _spec(help="model and input images in channels_last memory format (CUDA only; "
                                     "faster bf16 convolutions)")
    tf32: bool = _spec(help="TF32 matmuls and cuDNN convolutions for fp32 work (CUDA only)")
    fused_adamw: bool = _spec(help="fused AdamW optimizer kernel (CUDA only)")
    compile: bool = _spec(help="torch.compile the model (any device; slow first steps, pays off on "
                               "long runs)")
    workers: int = _spec(lo=0, help="DataLoader worker processes")
    checkpoint_interval: int = _spec(lo=1, help="steps between checkpoints")
    mlflow_checkpoints: int = _spec(lo=0, help="checkpoints kept in the MLflow run (artifacts checkpoints/step-*.pt, "
                                               "the newest named by checkpoints/latest.json; resume with --resume-from "
                                               "runs:/<run_id>); 0 = none")
    log_interval: int = _spec(lo=1, help="steps between logged losses")
    diagnostics_interval: int = _spec(lo=0, help="steps between similarity diagnostics (AUCs, per-loss gradient "
                                                 "norms; a multiple of log_interval; 0 = off)")
    pair_sampling: bool = _spec(help="batches of image pairs sharing a novel class")
    threads: int = _spec(lo=0, help="torch CPU threads (0 = the cores divided by the trainings running on the "
                                    "machine)")
    # Multi-process training (DistributedDataParallel under torchrun); batch_size is the global batch.
    nproc_per_node: int = _spec(lo=1, help="training processes per node (one per GPU); > 1 (or nnodes > 1) "
                                           "launches torchrun")
    nnodes: int = _spec(lo=1, help="nodes taking part (run the stage on each, with its node_rank)")
    node_rank: int = _spec(lo=0, help="this node's rank, 0 .. nnodes - 1 (node 0 hosts master_addr); under "
                                      "Slurm Slurm's SLURM_NODEID instead")
    master_addr: str = _spec(help="address of node 0, reachable from every node; under Slurm the first host "
                                  "of SLURM_JOB_NODELIST instead")
    master_port: int = _spec(lo=1, hi=65535, help="free TCP port on node 0 for the rendezvous")
    dist_backend: str = _spec(choices=DIST_BACKENDS, help="process group backend (auto = nccl on CUDA, "
                                                          "else gloo)")


@dataclass(frozen=True)
class PretrainConfig:
    iterations: int = _spec(lo=1, help="weak-shot pre-training steps (model.pretrained: weak_shot)")
    batch_size: int = _spec(lo=1, help="images per pre-training step")
    lr: float = _spec(lo=0.0, lo_open=True, help="pre-training AdamW learning rate (warm-up, then poly)")


@dataclass(frozen=True)
class EvalConfig:
    device: str = _spec(choices=DEVICES, help="auto = cuda when available, else cpu")
    max_images: int = _spec(lo=0, help="evaluate only the first N test images (0 = all)")


@dataclass(frozen=True)
class PseudoConfig:
    enabled: bool = _spec(help="pseudo-label the train set with the trained model, then retrain on it")
    iterations: int = _spec(lo=0, help="retraining iterations (0 = train.iterations)")


@dataclass(frozen=True)
class ReportConfig:
    title: str = _spec(help="title of the report pages")
    smoothing: int = _spec(lo=1, help="moving-average window for training curves")


@dataclass(frozen=True)
class SlurmConfig:
    """How each grid cell is requested from Slurm (``ablation.executor: slurm``; docs/CLUSTER.md)."""
    partition: str = _spec(help="partition the cells are submitted to ('' = the cluster's default partition)")
    gpus_per_cell: int = _spec(lo=0, help="GPUs per cell (--gpus-per-node; 0 = none)")
    cpus_per_cell: int = _spec(lo=1, help="CPU cores per cell (--cpus-per-task); the cell's torch threads when "
                                          "train.threads is 0")
    mem_gb: int = _spec(lo=0, help="memory per cell in GB (--mem; 0 = the partition's default)")
    time_min: int = _spec(lo=1, help="time limit of a cell in minutes (--time); a cell reaching it is "
                                     "requeued and resumes from its checkpoint")
    array_parallelism: int = _spec(lo=1, help="cells of the job array running at once (--array=0-N%P)")


@dataclass(frozen=True)
class AblationConfig:
    """The ablation grid: variants (name -> overrides on top of the main params) x seeds
    (cells: :meth:`cells`; a cell's params: :func:`pipeline.ablation.cell_params`)."""
    seeds: tuple[int, ...] = _spec(lo=0, help="seeds of the grid; each variant trains once per seed")
    splits: tuple[int, ...] = _spec(lo=1, empty_ok=True,
                                    help="base/novel splits of the grid (ids as data.split); each variant trains once "
                                         "per split and seed, a split other than data.split with its own split folder "
                                         "and weak-shot pre-training; [] = data.split only")
    iterations: int = _spec(lo=0, help="training iterations of a grid cell (0 = train.iterations)")
    workers: int = _spec(lo=1, help="cells trained at once, each in its own process")
    run: tuple[str, ...] = _spec(help="the variants trained, in this order (names of ablation.variants)")
    variants: dict = _spec(help="variant name -> overrides on top of the params above")
    executor: str = _spec(choices=EXECUTORS, help="where the cells run: local (ablation.workers processes on this "
                                                  "machine) or slurm (one job array, ablation.slurm)")
    slurm: SlurmConfig = _spec(help="the Slurm request of each cell (ablation.executor: slurm; docs/CLUSTER.md)")

    @property
    def trained(self) -> dict[str, dict]:
        """The variants of ``run`` with their overrides, in ``run`` order."""
        return {name: self.variants[name] for name in self.run}

    def cells(self) -> list[tuple[str, int]]:
        """(variant, seed): variants outer (``run`` order), seeds inner; each is trained once per split
        (:func:`pipeline.ablation.grid_cells` lists the cells with their split)."""
        return [(v, s) for v in self.run for s in self.seeds]


def check_splits(dataset: str, splits: typing.Iterable[int]) -> None:
    """``ablation.splits`` must name splits the dataset has (:data:`SPLIT_IDS`, as ``data.split``)."""
    allowed = SPLIT_IDS[dataset]
    bad = [k for k in splits if k not in allowed]
    if bad:
        raise ConfigError(f"params key 'ablation.splits': {bad[0]} is not a split of dataset '{dataset}'; allowed "
                          f"values: {', '.join(map(str, allowed))} (or [] for data.split only)")


@dataclass(frozen=True)
class Params:
    base: BaseConfig
    data: DataConfig
    model: ModelConfig
    loss: LossConfig
    train: TrainConfig
    pretrain: PretrainConfig
    eval: EvalConfig
    pseudo: PseudoConfig
    report: ReportConfig


GROUPS = typing.get_type_hints(Params)


def _type_name(tp, plural: bool = False) -> str:
    if plural:
        return {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(tp, str(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp, key: str):
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads '1e-4' as a string: accept a plain numeric string.
            try:
                value = float(value.strip())
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"params key '{key}': expected a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is tuple:       # a non-empty YAML list of one scalar type, no repeats
        item = typing.get_args(tp)[0]
        if not isinstance(value, list) or not value:
            raise ConfigError(f"params key '{key}': expected a non-empty list of {_type_name(item, plural=True)}, "
                              f"got {value!r}")
        items = tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
        if len(set(items)) != len(items):
            raise ConfigError(f"params key '{key}': {value!r} repeats a value")
        return items
    elif tp is dict:                           # a mapping of name -> mapping (or empty)
        if isinstance(value, Mapping) and value:
            return value
        raise ConfigError(f"params key '{key}': expected a non-empty mapping, got {value!r}")
    raise ConfigError(f"params key '{key}': expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls, values: Any, prefix: str):
    if not isinstance(values, Mapping):
        raise ConfigError(f"params key '{prefix}': expected a mapping of keys, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(fields), n=1)
        hint = f" Did you mean '{prefix}.{close[0]}'?" if close else ""
        raise ConfigError(f"unknown params key '{prefix}.{k}'.{hint} Allowed keys in '{prefix}': "
                          + ", ".join(sorted(fields)))
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        tp = hints[name]
        if name not in values:
            raise ConfigError(f"params key '{key}' is missing: the params file must set every key "
                              f"(python -m stages.train --help lists them)")
        value = values[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
            continue
        meta = f.metadata
        value = () if meta.get("empty_ok") and value == [] else _coerce(value, tp, key)
        if meta.get("choices") is not None and value not in meta["choices"]:
            raise ConfigError(f"params key '{key}': {value!r} is not allowed; allowed values: "
                              + ", ".join(map(str, meta["choices"])))
        for v in value if isinstance(value, tuple) else (value,):
            _check_range(v, meta, key)
        kwargs[name] = value
    return cls(**kwargs)


def _check_range(value, meta: Mapping, key: str) -> None:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        rel = ">" if meta.get("lo_open") else ">="
        raise ConfigError(f"params key '{key}': {value!r} is out of range; expected a value {rel} {lo}"
                          + (f" and <= {hi}" if hi is not None else ""))
    if hi is not None and value > hi:
        raise ConfigError(f"params key '{key}': {value!r} is out of range; expected a value <= {hi}")


def build_ablation(raw: Any) -> AblationConfig:
    """Validate the ``ablation`` group like every other group (missing, unknown, mistyped and
    out-of-range keys), then what only this group has: variant names, variants' overrides being
    mappings, ``run`` naming declared variants. Each variant's overrides are validated as whole
    params by :func:`pipeline.ablation.cell_params`."""
    a = _build(AblationConfig, raw if raw is not None else {}, "ablation")
    for name, ov in a.variants.items():
        if not isinstance(name, str) or not name or any(c in name for c in " /\\@"):
            raise ConfigError(f"params key 'ablation.variants': variant name {name!r} must be a non-empty string "
                              "without spaces, '/', '\\' or '@'")
        if ov is not None and not isinstance(ov, Mapping):
            raise ConfigError(f"params key 'ablation.variants.{name}': expected a mapping of params groups to "
                              f"overrides (e.g. {{loss: {{comp_weight: 0.0}}}}), got {ov!r}")
    unknown = [v for v in a.run if v not in a.variants]
    if unknown:
        raise ConfigError(f"params key 'ablation.run': {unknown[0]!r} is not a variant of ablation.variants; "
                          f"declared: {', '.join(map(str, a.variants))}")
    return dataclasses.replace(a, variants={k: dict(v or {}) for k, v in a.variants.items()})


def _check_cross(p: Params) -> None:
    allowed = SPLIT_IDS[p.data.dataset]
    if p.data.split not in allowed:
        raise ConfigError(f"params key 'data.split': {p.data.split} is out of range for dataset "
                          f"'{p.data.dataset}'; allowed values: {', '.join(map(str, allowed))}")
    if p.data.scale_min > p.data.scale_max:
        raise ConfigError(f"params keys 'data.scale_min' ({p.data.scale_min}) and 'data.scale_max' "
                          f"({p.data.scale_max}): expected scale_min <= scale_max")
    if p.model.hidden_dim % p.model.nheads:
        raise ConfigError(f"params key 'model.nheads': {p.model.nheads} must divide model.hidden_dim "
                          f"({p.model.hidden_dim})")
    for k in ("conv_dim", "mask_dim"):
        if getattr(p.model, k) % p.model.gn_groups:
            raise ConfigError(f"params key 'model.gn_groups': {p.model.gn_groups} must divide model.{k} "
                              f"({getattr(p.model, k)})")
    if p.loss.sim_base_points > p.loss.sim_points:
        raise ConfigError(f"params key 'loss.sim_base_points': {p.loss.sim_base_points} must be <= "
                          f"loss.sim_points ({p.loss.sim_points})")
    if p.train.pair_sampling and p.train.batch_size % 2:
        raise ConfigError(f"params key 'train.batch_size': {p.train.batch_size} must be even when "
                          "train.pair_sampling is true (batches are image pairs)")
    t = p.train
    if t.diagnostics_interval % t.log_interval:
        raise ConfigError(f"params key 'train.diagnostics_interval': {t.diagnostics_interval} must be a multiple of "
                          f"train.log_interval ({t.log_interval}) or 0 (diagnostics run at log steps)")
    if t.node_rank >= t.nnodes:
        raise ConfigError(f"params key 'train.node_rank': {t.node_rank} must be < train.nnodes ({t.nnodes})")
    check_world_batch(p, t.nproc_per_node * t.nnodes,
                      f"train.nproc_per_node x train.nnodes = {t.nproc_per_node} x {t.nnodes}")


def check_world_batch(p: Params, world: int, what: str) -> None:
    """The global ``train.batch_size`` must split evenly over ``world`` processes, and, when the
    batch is made of image pairs (``train.pair_sampling``, SimLoss / DistLoss pair images 0-1,
    2-3, ...), into an even number of images per process so that no pair is split."""
    if world <= 1:
        return
    b = p.train.batch_size
    if b % world:
        raise ConfigError(f"params key 'train.batch_size': {b} (the global batch) must be divisible by the number "
                          f"of training processes, {what} = {world}")
    pairs = p.train.pair_sampling or p.loss.sim_weight > 0 or p.loss.pp_weight > 0
    if pairs and (b // world) % 2:
        raise ConfigError(f"params key 'train.batch_size': {b} gives {b // world} images per process ({what} = "
                          f"{world}); that must be even when train.pair_sampling is true or loss.sim_weight / "
                          f"loss.pp_weight > 0 (image pairs are never split across processes)")


def build_params(raw: Mapping[str, Any] | None) -> Params:
    """Validate a params mapping (the parsed params file: every key set) and build :class:`Params`.
    Top-level groups that are not typed here are accepted when listed in :data:`EXTRA_TOP_LEVEL`
    (``ablation``: validated by ``pipeline/ablation.py``)."""
    raw = dict(raw or {})
    unknown = [k for k in raw if k not in GROUPS and k not in EXTRA_TOP_LEVEL]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(GROUPS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown params group '{k}'.{hint} Allowed groups: "
                          + ", ".join(sorted(list(GROUPS) + list(EXTRA_TOP_LEVEL))))
    missing = [g for g in GROUPS if g not in raw]
    if missing:
        raise ConfigError(f"params group '{missing[0]}' is missing: the params file must set every key "
                          f"(python -m stages.train --help lists them)")
    kwargs = {name: _build(tp, raw[name], name) for name, tp in GROUPS.items()}
    p = Params(**kwargs)
    _check_cross(p)
    return p



def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (MLflow does not flatten nested params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def params_file_text(p: Params, what: str) -> str:
    """The params a run used as a params file: a cell's or the retraining's ``params.yaml`` artifact."""
    import yaml
    return f"# effective params of {what}\n" + yaml.safe_dump(to_dict(p), sort_keys=False)


def hashed_params(p: Params, groups: typing.Iterable[str] = ("base", "data", "model", "loss", "train")) -> dict:
    """The groups that determine a trained model, as :func:`params_hash` hashes them (``train``
    without :data:`NOT_HASHED`)."""
    d = {g: to_dict(getattr(p, g)) for g in groups}
    if "train" in d:
        d["train"] = {k: v for k, v in d["train"].items() if k not in NOT_HASHED}
    return d


def params_hash(p: Params, groups: typing.Iterable[str] = ("base", "data", "model", "loss", "train")) -> str:
    """Stable short hash of the groups that determine a trained model (the launch keys of
    ``train`` and ``train.mlflow_checkpoints``, :data:`NOT_HASHED`, left out)."""
    blob = json.dumps(hashed_params(p, groups), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def novel_mask_use(p: Params) -> str | None:
    """What of a run's training reads the novel classes' masks - ``"fully supervised oracle"``
    (``loss.oracle``) or ``"oracle teacher"`` (``loss.pp_teacher: oracle`` with DistLoss on) - or None
    for a weak-shot run. Such a run is a diagnostic or a bound, never a weak-shot result: MLflow
    tags it and the report says so wherever it appears."""
    if p.loss.oracle:
        return "fully supervised oracle"
    if p.loss.pp_teacher == "oracle" and p.loss.pp_weight > 0:
        return "oracle teacher"
    return None


def _describe_spec(f: dataclasses.Field, tp) -> str:
    m = f.metadata
    if m.get("choices") is not None:
        allowed = " | ".join(map(str, m["choices"]))
    else:
        allowed = _type_name(tp).removeprefix("an ").removeprefix("a ")
        if m.get("lo") is not None:
            allowed += f" {'>' if m.get('lo_open') else '>='} {m['lo']}"
        if m.get("hi") is not None:
            allowed += f" <= {m['hi']}"
    return f"[{allowed}] {m.get('help', '')}".rstrip()


def describe(raw: Mapping[str, Any]) -> str:
    """Every params key with its value in ``raw`` (the parsed params file), its type or allowed
    values and its help, for --help texts; nested groups (``data.synthetic.*``) and the
    ``ablation`` group included."""
    missing = object()

    def group(tp, values, indent: str) -> list[str]:
        values = values if isinstance(values, Mapping) else {}
        hints, lines = typing.get_type_hints(tp), []
        for f in dataclasses.fields(tp):
            v = values.get(f.name, missing)
            if dataclasses.is_dataclass(hints[f.name]):
                lines += [f"{indent}{f.name}:  {f.metadata.get('help', '')}".rstrip()]
                lines += group(hints[f.name], v, indent + "  ")
            else:
                shown = "(missing)" if v is missing else json.dumps(v)
                lines.append(f"{indent}{f.name}: {shown}  {_describe_spec(f, hints[f.name])}")
        return lines

    lines = []
    for gname, gtp in GROUPS.items():
        lines += [f"{gname}:"] + group(gtp, raw.get(gname), "  ")
    values = raw.get("ablation") if isinstance(raw.get("ablation"), Mapping) else {}
    lines.append("ablation:")
    hints = typing.get_type_hints(AblationConfig)
    for f in dataclasses.fields(AblationConfig):
        v, help_ = values.get(f.name, missing), f.metadata.get("help", "")
        if dataclasses.is_dataclass(hints[f.name]):     # ablation.slurm: its keys with their help
            lines += [f"  {f.name}:  {help_}"] + group(hints[f.name], v, "    ")
        elif isinstance(v, Mapping):          # ablation.variants: one line per variant
            lines += [f"  {f.name}:  {help_}"] + [f"    {k}: {json.dumps(x)}" for k, x in v.items()]
        else:
            lines.append(f"  {f.name}: {'(missing)' if v is missing else json.dumps(v)}  {help_}")
    return "\n".join(lines)
