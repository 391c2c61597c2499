"""The ablation grid: variants (name -> overrides on top of the main params) x seeds.

``params.yaml``::

    ablation:
      seeds: [6, 7]
      iterations: 150          # training iterations of a cell; 0 = train.iterations
      workers: 2               # cells trained at once (the ablate stage)
      variants:
        baseline: {loss: {comp_weight: 0.0, sim_weight: 0.0, pp_weight: 0.0}}
        full: {}

A cell's params are the main params with the variant's overrides applied, ``base.seed`` set
to the cell's seed and, when ``iterations`` is not 0, ``train.iterations`` set to it. Every
override is validated like params.yaml itself, so a typo names the variant and the key.
A cell whose resolved params equal the main training's reuses that model instead of
training again (compare :func:`pipeline.config.params_hash`).
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from .config import ConfigError, Params, build_params, params_hash

# the variants of the paper's ablation, declared in params.yaml (ablation.run picks those trained)
REQUIRED_VARIANTS = ("baseline", "+complementary", "+similarity", "full", "oracle")


@dataclass(frozen=True)
class Ablation:
    seeds: tuple[int, ...]
    iterations: int
    variants: dict[str, dict]        # the variants trained (``ablation.run``), in that order
    declared: dict[str, dict] = field(default_factory=dict)   # every variant of ``ablation.variants``
    workers: int = 1                 # cells trained at once, each in its own process

    def cells(self) -> list[tuple[str, int]]:
        """(variant, seed): variants outer (``ablation.run`` order), seeds inner."""
        return [(v, s) for v in self.variants for s in self.seeds]


def cell_key(variant: str, seed: int) -> str:
    """The key of a cell: ``<variant>-<seed>`` (also its output and checkpoint folder names)."""
    return f"{variant}-{seed}"


def parse_ablation(raw: Mapping[str, Any] | None) -> Ablation:
    """Validate the ``ablation`` group (structure only; overrides are checked by :func:`cell_params`)."""
    raw = dict(raw or {})
    allowed = {"seeds", "iterations", "variants", "run", "workers"}
    for k in raw:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), sorted(allowed), n=1)
            hint = f" Did you mean 'ablation.{close[0]}'?" if close else ""
            raise ConfigError(f"unknown params key 'ablation.{k}'.{hint} Allowed keys: {', '.join(sorted(allowed))}")
    if missing := sorted(allowed - set(raw)):         # params.yaml is the only place a value lives
        raise ConfigError(f"params key 'ablation.{missing[0]}' is missing: the params file must set every key")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                            and s >= 0 for s in seeds):
        raise ConfigError(f"params key 'ablation.seeds': expected a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"params key 'ablation.seeds': {seeds!r} repeats a seed")
    iterations = raw["iterations"]
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise ConfigError(f"params key 'ablation.iterations': expected an integer >= 0 (0 = train.iterations), "
                          f"got {iterations!r}")
    workers = raw["workers"]
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"params key 'ablation.workers': expected an integer >= 1 (cells trained at once), "
                          f"got {workers!r}")
    variants = raw["variants"]
    if not isinstance(variants, Mapping) or not variants:
        raise ConfigError("params key 'ablation.variants': expected a mapping of variant name -> overrides")
    for name, ov in variants.items():
        if not isinstance(name, str) or not name or any(c in name for c in " /\\@"):
            raise ConfigError(f"params key 'ablation.variants': variant name {name!r} must be a non-empty string "
                              "without spaces, '/', '\\' or '@'")
        if ov is not None and not isinstance(ov, Mapping):
            raise ConfigError(f"params key 'ablation.variants.{name}': expected a mapping of params groups to "
                              f"overrides (e.g. {{loss: {{comp_weight: 0.0}}}}), got {ov!r}")
    run = raw["run"]
    if not isinstance(run, list) or not run or not all(isinstance(v, str) for v in run):
        raise ConfigError(f"params key 'ablation.run': expected a non-empty list of variant names, got {run!r}")
    if len(set(run)) != len(run):
        raise ConfigError(f"params key 'ablation.run': {run!r} repeats a variant")
    unknown = [v for v in run if v not in variants]
    if unknown:
        raise ConfigError(f"params key 'ablation.run': {unknown[0]!r} is not a variant of ablation.variants; "
                          f"declared: {', '.join(variants)}")
    return Ablation(tuple(seeds), iterations, {k: dict(variants[k] or {}) for k in run},
                    {k: dict(v or {}) for k, v in variants.items()}, workers)


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


def cell_params(main_raw: Mapping[str, Any], ablation: Ablation, variant: str, seed: int) -> Params:
    """The validated params of one grid cell."""
    declared = ablation.declared or ablation.variants
    if variant not in declared:
        raise ConfigError(f"ablation variant '{variant}' is not in ablation.variants; allowed: "
                          + ", ".join(declared))
    main = {k: v for k, v in dict(main_raw).items() if k != "ablation"}
    try:
        merged = _merge(main, declared[variant], "")
    except ConfigError as e:
        raise ConfigError(f"ablation variant '{variant}': {e}") from None
    merged = _merge(merged, {"base": {"seed": seed}}, "")
    if ablation.iterations:
        merged = _merge(merged, {"train": {"iterations": ablation.iterations}}, "")
    try:
        return build_params(merged)
    except ConfigError as e:
        raise ConfigError(f"ablation variant '{variant}': {e}") from None


def pp_weight_sweep(main_raw: Mapping[str, Any], ablation: Ablation) -> dict[str, float]:
    """The grid's DistLoss weight sweep: every variant (``full`` included) whose cells train full
    SimFormer with only ``loss.pp_weight`` changed, mapped to that weight; empty without ``full``."""
    if "full" not in ablation.variants:
        return {}
    seed = ablation.seeds[0]
    full = cell_params(main_raw, ablation, "full", seed)
    out = {}
    for v in ablation.variants:
        cell = cell_params(main_raw, ablation, v, seed)
        if replace(cell, loss=replace(cell.loss, pp_weight=full.loss.pp_weight)) == full:
            out[v] = cell.loss.pp_weight
    return out


def grid_hash(cell_hashes: list[str]) -> str:
    """Identifies one grid (its cells' params) for its MLflow parent run."""
    return hashlib.sha256(json.dumps(sorted(cell_hashes)).encode()).hexdigest()[:16]


def shares_main_training(main: Params, cell: Params) -> bool:
    return params_hash(main) == params_hash(cell)


def cell_runs(main_raw: Mapping[str, Any], ablation: Ablation, metrics: Mapping[tuple[str, int], Mapping]) -> list[dict]:
    """Per cell, what :func:`sync_grid` needs: ``variant, seed, params_hash,
    params_flat, params_text`` (the effective params) and ``metrics`` (``metrics[(variant, seed)]``)."""
    from .config import flatten, params_file_text, to_dict
    out = []
    for v, s in ablation.cells():
        p = cell_params(main_raw, ablation, v, s)
        out.append({"variant": v, "seed": s, "params_hash": params_hash(p), "params_flat": flatten(to_dict(p)),
                    "params_text": params_file_text(p, f"ablation cell {cell_key(v, s)}"),
                    "metrics": dict(metrics[(v, s)])})
    return out


def sync_grid(root, experiment: str, grid_id: str, grid_params: Mapping[str, Any],
              cells: list[dict], grid_metrics: Mapping[str, float], params_yaml_text: str,
              artifacts: Iterable = ()) -> dict:
    """The grid's parent run (found again by ``grid_id``) and one child per cell.

    ``cells``: dicts with ``variant``, ``seed``, ``params_hash``, ``params_flat``,
    ``params_text`` (the cell's effective params) and ``metrics``. A cell's own run (found by
    params hash: the ablate stage's, or the main training's for the shared cell) becomes the
    child when it has no parent; one that already belongs to another grid gets a link child
    here (tag ``linked_run_id``; the run itself is never moved); a cell restored by a DVC
    run-cache hit has no run in this store, so one is made from its saved metrics. Running
    again creates nothing. ``grid_metrics`` (per-variant mean and std) and ``artifacts``
    (tables, report) go on the parent. Returns ``{"parent": id, "children": {"<variant>-<seed>": id}}``.
    """
    from mlflow.entities import Param

    from . import tracking
    parent = tracking.RunTracker(root, experiment, strict=True)
    with parent:
        parent.start(f"grid-{grid_id}", tracking.run_name("ablation-grid"), grid_params, params_yaml_text,
                     tags={"role": "ablation_grid", "grid_id": grid_id,
                           "mlflow.note.content": f"Ablation grid {grid_id}: {len(cells)} cells"},
                     include_finished=True)
        client, exp_id = parent.client, parent.experiment_id
        children = {}
        for cell in cells:
            name = f"{cell['variant']}-seed{cell['seed']}"
            tags = {"variant": cell["variant"], "seed": str(cell["seed"]), "grid_id": grid_id,
                    "mlflow.parentRunId": parent.run_id}
            own = next(iter(tracking.find_runs(client, exp_id, {"params_hash": cell["params_hash"]})), None)
            if own is None or own.data.tags.get("mlflow.parentRunId") in (None, parent.run_id):
                with tracking.RunTracker(root, experiment, strict=True) as tr:
                    tr.start(cell["params_hash"], tracking.run_name(name), cell["params_flat"], cell["params_text"],
                             {"stage": "ablate", **tags}, include_finished=True)
                    tr.set_tags(tags)
                    if own is None:          # a run-cache hit left this cell without a run
                        tr.log_metrics(cell["metrics"])
                        tr.set_tags({"restored_from": "dvc_run_cache"})
                children[name] = tr.run_id
                continue
            link = next(iter(tracking.find_runs(client, exp_id, {"grid_id": grid_id, "linked_run_id": own.info.run_id})), None)
            if link is None:
                note = (f"Cached cell: trained in run {own.info.run_id} (grid {own.data.tags.get('grid_id', '?')}); "
                        "this run only links to it.")
                link = client.create_run(exp_id, run_name=tracking.run_name(name) + " (cached)",
                                         tags={**tags, "role": "cell_link", "linked_run_id": own.info.run_id,
                                               "cell_params_hash": cell["params_hash"], "mlflow.note.content": note})
                client.log_batch(link.info.run_id, metrics=tracking.metric_entities(cell["metrics"]),
                                 params=[Param(k, str(v)) for k, v in cell["params_flat"].items()])
                client.set_terminated(link.info.run_id, "FINISHED")
            children[name] = link.info.run_id
        logged = client.get_run(parent.run_id).data.metrics
        parent.log_metrics({k: v for k, v in grid_metrics.items() if logged.get(tracking.metric_key(k)) != v})
        for path in artifacts:
            parent.log_artifact(path, "report")
    return {"parent": parent.run_id, "children": children}
