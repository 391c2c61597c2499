"""The ablation grid: variants (name -> overrides on top of the main params) x splits x seeds.

``params.yaml``::

    ablation:
      seeds: [6, 7]
      splits: []               # base/novel splits; [] = data.split only
      iterations: 150          # training iterations of a cell; 0 = train.iterations
      workers: 2               # cells trained at once (the ablate stage)
      variants:
        baseline: {loss: {comp_weight: 0.0, sim_weight: 0.0, pp_weight: 0.0}}
        full: {}

A cell's params are the main params with the variant's overrides applied, ``base.seed`` set
to the cell's seed, ``data.split`` to the cell's split and, when ``iterations`` is not 0,
``train.iterations`` set to it. Every override is validated like params.yaml itself, so a
typo names the variant and the key. A cell whose resolved params equal the main training's
reuses that model instead of training again (compare :func:`pipeline.config.params_hash`):
only a cell on ``data.split`` can.

Cell keys (also the cells' output and checkpoint folder names, and the ablate stage's
``--cell``): ``<variant>-<seed>`` on ``data.split``, exactly as a grid without
``ablation.splits``; ``<variant>-s<split>-<seed>`` on another split (``full-s2-7``). So adding
splits to a grid keeps its ``data.split`` cells, their checkpoints and their MLflow runs.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any, Mapping

from .config import AblationConfig, ConfigError, Params, build_params, check_splits, novel_mask_use, params_hash

# the variants of the paper's ablation, declared in params.yaml (ablation.run picks those trained)
REQUIRED_VARIANTS = ("baseline", "+complementary", "+similarity", "full", "oracle")


def main_variant(ablation: AblationConfig | None) -> str | None:
    """The variant that *is* the main params (declared with no overrides: ``full``), or None."""
    return next((v for v, over in (ablation.variants if ablation else {}).items() if not over), None)


def main_run_name(ablation: AblationConfig | None, seed: int) -> str:
    """The MLflow run name of the main training: ``full-seed6 (main)`` (its grid cell's name, marked
    as the main model), ``main-seed6`` without a variant that equals the main params."""
    v = main_variant(ablation)
    return f"{v}-seed{seed} (main)" if v else f"main-seed{seed}"


def cell_key(variant: str, seed: int, split: int | None = None) -> str:
    """The key of a cell: ``<variant>-<seed>``, or ``<variant>-s<split>-<seed>`` for a cell on a split
    other than ``data.split`` (``split`` given); also its output and checkpoint folder names."""
    return f"{variant}-{seed}" if split is None else f"{variant}-s{split}-{seed}"


def cell_run_name(variant: str, seed: int, split: int | None = None) -> str:
    """The MLflow run name of a cell: ``<variant>-seed<seed>``, or ``<variant>-split<split>-seed<seed>``
    on a split other than ``data.split``."""
    return f"{variant}-seed{seed}" if split is None else f"{variant}-split{split}-seed{seed}"


class CellNames:
    """A cell's key and MLflow run name, from its ``variant``, ``seed`` and ``key_split`` (the split
    they carry: None on the main params' ``data.split``)."""
    variant: str
    seed: int

    @property
    def key(self) -> str:
        return cell_key(self.variant, self.seed, self.key_split)

    @property
    def run_name(self) -> str:
        return cell_run_name(self.variant, self.seed, self.key_split)


@dataclass(frozen=True)
class Cell(CellNames):
    """One cell of the grid: a variant trained at a seed on a split (its ``data.split``)."""
    variant: str
    seed: int
    split: int
    on_main_split: bool         # split == the main params' data.split: key and run name as without splits

    @property
    def key_split(self) -> int | None:
        """The split the key and run name carry, and :func:`cell_params` sets: None on ``data.split``
        (the main params' own)."""
        return None if self.on_main_split else self.split


def grid_splits(ablation: AblationConfig, main_split: int) -> tuple[int, ...]:
    """The splits of the grid: ``ablation.splits``, or ``(data.split,)`` when that is empty."""
    return ablation.splits or (main_split,)


def grid_cells(ablation: AblationConfig, main_split: int) -> list[Cell]:
    """Every cell of the grid: variants outer (``run`` order), then splits (``ablation.splits``
    order), seeds inner; without ``ablation.splits``, :meth:`AblationConfig.cells` on ``data.split``."""
    return [Cell(v, s, k, k == main_split) for v in ablation.run for k in grid_splits(ablation, main_split)
            for s in ablation.seeds]


def _merge(base: dict, over: Mapping, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping):
            if k in out and not isinstance(out[k], Mapping):
                raise ConfigError(f"params key '{where}.{k}': expected a value, got a mapping")
            out[k] = _merge(out.get(k, {}) or {}, v, f"{where}.{k}")
        else:
            out[k] = v
    return out


def cell_params(main_raw: Mapping[str, Any], ablation: AblationConfig, variant: str, seed: int,
                split: int | None = None) -> Params:
    """The validated params of one grid cell (``split``: its ``data.split``; None keeps the main one)."""
    declared = ablation.variants
    if variant not in declared:
        raise ConfigError(f"ablation variant '{variant}' is not in ablation.variants; allowed: "
                          + ", ".join(declared))
    main = {k: v for k, v in dict(main_raw).items() if k != "ablation"}
    try:
        merged = _merge(main, declared[variant], "")
    except ConfigError as e:
        raise ConfigError(f"ablation variant '{variant}': {e}") from None
    merged = _merge(merged, {"base": {"seed": seed}}, "")
    if split is not None:
        merged = _merge(merged, {"data": {"split": split}}, "")
    if ablation.iterations:
        merged = _merge(merged, {"train": {"iterations": ablation.iterations}}, "")
    try:
        return build_params(merged)
    except ConfigError as e:
        raise ConfigError(f"ablation variant '{variant}': {e}") from None


def pp_weight_sweep(main_raw: Mapping[str, Any], ablation: AblationConfig) -> dict[str, float]:
    """The grid's DistLoss weight sweep: every variant (``full`` included) whose cells train full
    SimFormer with only ``loss.pp_weight`` changed, mapped to that weight; empty without ``full``."""
    if "full" not in ablation.run:
        return {}
    seed = ablation.seeds[0]
    full = cell_params(main_raw, ablation, "full", seed)
    out = {}
    for v in ablation.run:
        cell = cell_params(main_raw, ablation, v, seed)
        if replace(cell, loss=replace(cell.loss, pp_weight=full.loss.pp_weight)) == full:
            out[v] = cell.loss.pp_weight
    return out


def novel_mask_variants(main_raw: Mapping[str, Any], ablation: AblationConfig) -> dict[str, str]:
    """The trained variants whose training reads novel masks, with what does
    (:func:`pipeline.config.novel_mask_use`: ``oracle teacher``, ``fully supervised oracle``)."""
    out = {}
    for v in ablation.run:
        use = novel_mask_use(cell_params(main_raw, ablation, v, ablation.seeds[0]))
        if use:
            out[v] = use
    return out


def grid_hash(cell_hashes: list[str]) -> str:
    """Identifies one grid (its cells' params) for its MLflow parent run."""
    return hashlib.sha256(json.dumps(sorted(cell_hashes)).encode()).hexdigest()[:16]


def shares_main_training(main: Params, cell: Params) -> bool:
    return params_hash(main) == params_hash(cell)


def cell_runs(main_raw: Mapping[str, Any], ablation: AblationConfig, metrics: Mapping[str, Mapping]) -> list[dict]:
    """Per cell, what :func:`pipeline.tracking.sync_grid` needs: ``variant, seed, split, name`` (the
    run name), ``params_hash, params_flat, params_text`` (the effective params) and ``metrics``
    (``metrics[<cell key>]``)."""
    from .config import flatten, params_file_text, to_dict
    out = []
    for c in grid_cells(ablation, build_params(_main(main_raw)).data.split):
        p = cell_params(main_raw, ablation, c.variant, c.seed, c.key_split)
        out.append({"variant": c.variant, "seed": c.seed, "split": c.split, "name": c.run_name,
                    "params_hash": params_hash(p), "params_flat": flatten(to_dict(p)),
                    "params_text": params_file_text(p, f"ablation cell {c.key}"), "metrics": dict(metrics[c.key])})
    return out


def _main(main_raw: Mapping[str, Any]) -> dict:
    return {k: v for k, v in dict(main_raw).items() if k != "ablation"}


def check_variants(main_raw: Mapping[str, Any], ablation: AblationConfig) -> None:
    """Validate every declared variant's overrides as whole params (a typo names the variant and
    the key), and ``ablation.splits`` against the dataset's splits, before any work."""
    for variant in ablation.variants:
        cell_params(main_raw, ablation, variant, ablation.seeds[0])
    # validation only, like build_params': read from the (validated) mapping, so that no stage counts as
    # reading data.dataset / data.split for its results (tests/test_stage_deps.py)
    data = main_raw["data"]
    check_splits(data["dataset"], ablation.splits)
    keys = [c.key for c in grid_cells(ablation, data["split"])]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice:       # e.g. a variant 'a-s2' beside 'a' on split 2
        raise ConfigError(f"params key 'ablation.splits': two cells of the grid would share the key {twice!r}; "
                          "rename the variant")
