"""Running the ablation grid: one cell (:func:`run_cell`), and every cell, ``workers`` at a time
(:func:`plan_cells`, :func:`run_cells`). What a cell *is* (its params, its key) lives in
:mod:`pipeline.ablation`; the grid's params in :class:`pipeline.config.AblationConfig`.

A cell whose params equal the main training's reuses that model (never trains twice); others
train with a resumable checkpoint (a finished one is only evaluated again). Each cell is
evaluated like the main model, scored on the held-out test pixel pairs
(:func:`pipeline.engine.heldout.heldout_similarity`: cell.json ``heldout``, MLflow metrics
``heldout_auc_*``) and written to its own folder: cell.json, metrics.json, per_class_iou.csv,
curve.csv and, when it trained, model.pt (with its SimNet). A cell whose training reads novel
masks (the oracle teacher, the fully supervised oracle) is tagged ``diagnostic: uses novel masks
(...)`` in MLflow and cell.json.

Cells train ``workers`` at a time, each in its own spawned process with a fixed number of torch
threads (:func:`pipeline.jobs.run_parallel`), so a cell's result never depends on which cells run
beside it: it is bit-identical on one machine for the same threads (cell.json and the MLflow tag
``torch_threads`` record them). The longest cells start first. Why not submitit's LocalExecutor:
it starts every submitted job at once (4 jobs of a 4-job ``map_array`` all started within 1.6 s,
measured), so it has no ``workers`` limit nor start order, and every job costs two extra Python
processes and pickles in a folder; the pool keeps both guarantees and already streams results,
stops the others on the first failure and on Ctrl-C / SIGTERM.

``ablation.splits`` (:func:`pipeline.ablation.grid_cells`): the cells of ``data.split`` use the
pipeline's own split folder and weak-shot initialisation (the prepare and pretrain stages'); each
other split gets its own, made once by :func:`prepare_split` under the checkpoints folder
(``<checkpoints>/split-<k>/split/`` and ``init.pt``, :func:`split_inputs`) and shared by that split's
cells. The ablate stage prepares every split the cells need, one after the other, *before* any cell
starts (:func:`prepare_splits`), each pre-training with all the stage's cores like the pretrain stage
(or, with ``train.threads`` fixed, ``cores // train.threads`` pre-trainings at once).
Why not as jobs of the cells' pool: a split's cells cannot start before its pre-training ends, and
:func:`pipeline.jobs.run_parallel` has no dependencies between jobs; running them first keeps the pool,
its fixed threads (bit-identical cells) and its failure handling as they are, for the cost of cells of
``data.split`` idling while an extra split pre-trains (one pre-training per extra split, once: the
pretrain library has no checkpoint, so an interrupted pre-training starts again, but a finished
``init.pt`` is reused while the params it depends on (:func:`pretrain_hash`) are unchanged).
Cells on another split log to the grid's MLflow experiment (``data.split``'s), with their split as the
param ``data.split`` and the tag ``split`` (every cell has the tag) and run names
``<variant>-split<k>-seed<seed>``.

``ablation.executor: slurm``: the same cells as one Slurm job array through submitit
(:mod:`pipeline.executor`), each writing ``job.out`` on the shared filesystem; without an MLflow
server the cells log nothing and the stage logs the gathered outputs (:func:`log_gathered_cell`).

MLflow: each cell's run is found again by params hash, so running again never duplicates it.
A finished run is history: it is reopened only to re-evaluate the finished checkpoint it
recorded, and gets only metrics it lacks. A cell that trains again although a finished run of
its params exists (its checkpoint was removed), or whose finished checkpoint evaluates to other
numbers than the run recorded, gets a new run, tagged ``differs_from_run_id`` when the old
one's metrics disagree.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .ablation import CellNames, cell_params, grid_cells, shares_main_training
from .config import AblationConfig, Params, flatten, params_file_text, params_hash, to_dict

SIMILARITY_COST = 1.7       # a step with SimLoss / DistLoss against one without (start order only)
RESULT_KEYS = ("mIoU", "mIoU_base", "mIoU_novel", "hIoU")


@dataclass(frozen=True)
class CellJob(CellNames):
    """Everything one cell needs; picklable (it crosses into a spawned worker)."""
    variant: str
    seed: int
    params: Params              # the cell's effective params
    params_text: str            # its params.yaml artifact (the main file's text for the shared cell)
    shared: bool                # the params equal the main training's: evaluate that model
    dataset_dir: Path
    split_dir: Path
    init: Path | None           # the pretrain stage's output (model.pretrained: weak_shot)
    main_model: Path
    checkpoint: Path            # <checkpoints>/<key>/cell.pt
    out: Path                   # <out>/<key>/
    threads: int                # torch threads (0: a fair share of the cores, pipeline.jobs.CoreShare)
    mlflow: bool = True
    progress: bool = False
    main_split: int | None = None   # the main params' data.split (None: the cell's own)

    @property
    def key_split(self) -> int | None:
        """The cell's split when it is not the main params' ``data.split`` (its key and run name carry
        it), else None."""
        k = self.params.data.split
        return None if self.main_split is None or k == self.main_split else k

    def experiment(self) -> str | None:
        """The grid's MLflow experiment (``data.split``'s) for a cell on another split; None: the one of
        the cell's own params (the same, on ``data.split``)."""
        from .tracking import experiment_name
        return None if self.key_split is None else experiment_name(self.params.data.dataset, self.main_split)


def finished_checkpoint(path: Path, phash: str, iterations: int) -> bool:
    """True when ``path`` holds the final checkpoint of the params with hash ``phash``."""
    from .engine.checkpoint import checkpoint_step
    return checkpoint_step(path, phash) == iterations


def cell_cost(p: Params, shared: bool) -> float:
    """Relative training time of a cell (start order only: the longest first)."""
    if shared:
        return 0.0
    return p.train.iterations * (SIMILARITY_COST if p.loss.sim_weight > 0 or p.loss.pp_weight > 0 else 1.0)


def plan_cells(main: Params, main_raw: Mapping[str, Any], grid: AblationConfig, main_text: str, *,
               dataset_dir: Path, split_dir: Path, init: Path | None, main_model: Path, checkpoints: Path,
               out: Path, cores: int, only: list[str] | None = None, mlflow: bool = True,
               progress: bool = True) -> tuple[list[CellJob], int, int]:
    """The grid's cells as jobs, longest first, with the workers and torch threads they run with.

    ``only``: cell keys (``<variant>-<seed>``, ``<variant>-s<split>-<seed>``) to run instead of the
    whole grid (an unknown key is a ValueError naming the grid's cells). A cell on ``data.split`` reads
    ``split_dir`` and ``init``; one on another split ``k`` reads :func:`split_inputs` ``(checkpoints,
    k)`` (:func:`prepare_splits` makes them). Threads per cell: ``train.threads``, else ``cores //
    workers`` (0 when one cell runs at a time: the fair share of :class:`pipeline.jobs.CoreShare`).
    With ``ablation.executor: slurm``: ``workers`` is ``ablation.slurm.array_parallelism`` and the
    threads ``train.threads`` or ``ablation.slurm.cpus_per_cell``.
    Returns ``(jobs, workers, threads)``.
    """
    cells = grid_cells(grid, main.data.split)
    if only:
        keys = {c.key: c for c in cells}
        unknown = [c for c in only if c not in keys]
        if unknown:
            raise ValueError(f"--cell {unknown[0]!r} is not a cell of the grid; cells: {', '.join(keys)}")
        cells = [keys[c] for c in dict.fromkeys(only)]
    if grid.executor == "slurm":    # each cell on its own allocation of ablation.slurm.cpus_per_cell cores
        workers = min(grid.slurm.array_parallelism, len(cells))
        threads, progress = main.train.threads or grid.slurm.cpus_per_cell, False
    else:
        workers = min(grid.workers, len(cells))
        threads = main.train.threads or (0 if workers == 1 else max(1, cores // workers))
    jobs = []
    for c in cells:
        p = cell_params(main_raw, grid, c.variant, c.seed, c.key_split)
        shared = shares_main_training(main, p)      # never on another split: data.split differs
        if c.on_main_split:
            cell_split_dir, cell_init = Path(split_dir), Path(init) if init else None
        else:
            cell_split_dir, cell_init = split_inputs(checkpoints, c.split)
        text = main_text if shared else params_file_text(p, f"ablation cell {c.key}")
        jobs.append(CellJob(c.variant, c.seed, p, text, shared, Path(dataset_dir), cell_split_dir, cell_init,
                            Path(main_model), Path(checkpoints) / c.key / "cell.pt", Path(out) / c.key, threads, mlflow,
                            progress and workers == 1, main_split=main.data.split))
    jobs.sort(key=lambda j: -cell_cost(j.params, j.shared))      # longest first; stable otherwise
    return jobs, workers, threads


def split_inputs(checkpoints: Path, split: int) -> tuple[Path, Path]:
    """The split folder and weak-shot initialisation of a grid split other than ``data.split``:
    ``<checkpoints>/split-<k>/split/`` and ``<checkpoints>/split-<k>/init.pt``."""
    root = Path(checkpoints) / f"split-{split}"
    return root / "split", root / "init.pt"


# what the weak-shot pre-training reads: the pretrain stage's params (dvc.yaml), what the dataset is
# (the download stage's params) and the split
PRETRAIN_KEYS = ("base.seed", "data.dataset", "data.synthetic", "data.url", "data.checksum", "data.split",
                 "data.crop_size", "data.scale_min", "data.scale_max", "data.photometric", "model.backbone",
                 "model.pretrained", "model.conv_dim", "model.mask_dim", "model.gn_groups", "train.weight_decay",
                 "train.device", "train.threads", "pretrain")


def pretrain_hash(p: Params) -> str:
    """Identifies a weak-shot pre-training: a hash of the values of :data:`PRETRAIN_KEYS` in ``p``."""
    import hashlib
    import json
    flat = flatten(to_dict(p))
    picked = {k: v for k, v in flat.items() if any(k == x or k.startswith(x + ".") for x in PRETRAIN_KEYS)}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_split(main: Params, split: int, dataset_dir: Path, split_dir: Path, init: Path, *,
                  progress: bool = True, say: Callable[[str], None] = print) -> bool:
    """The split folder (the prepare stage's :func:`pipeline.data.splits.build_split`) and weak-shot
    initialisation (the pretrain stage's :func:`pipeline.engine.pretrain.weak_shot_init`, with the main
    params on ``split``) of one grid split other than ``data.split``; ``init``'s pre-training curve
    beside it (``pretrain_curve.csv``). The split folder is made again every time (a scan of the
    labels); a finished ``init`` of the same :func:`pretrain_hash` is reused. Every file is written
    atomically. Returns True when it pre-trained."""
    import dataclasses

    import torch

    from .data.splits import build_split, write_split
    from .engine.pretrain import weak_shot_init
    from .io import atomic_path, write_csv
    p = dataclasses.replace(main, data=dataclasses.replace(main.data, split=split))
    doc, index = build_split(dataset_dir, p.data.dataset, split, workers=p.data.prepare_workers, progress=progress)
    write_split(split_dir, doc, index)
    phash = pretrain_hash(p)
    if Path(init).is_file():
        try:
            done = torch.load(init, map_location="cpu", weights_only=True).get("pretrain_hash") == phash
        except Exception:  # noqa: BLE001 - an unreadable leftover is made again
            done = False
        if done:
            say(f"split {split}: reusing its weak-shot initialisation {init}")
            return False
    what = (f"pre-training its weak-shot initialisation ({p.pretrain.iterations} steps)"
            if p.model.pretrained == "weak_shot" else f"no pre-training (model.pretrained: {p.model.pretrained})")
    say(f"split {split} ({len(doc['base'])} base, {len(doc['novel'])} novel classes): {what} -> {init}")
    state, curve = weak_shot_init(p, dataset_dir, index, doc, progress=progress)
    write_csv(Path(init).with_name("pretrain_curve.csv"), curve)
    with atomic_path(init) as tmp:
        torch.save({**state, "pretrain_hash": phash}, tmp)
    return True


def prepare_splits(main: Params, jobs: list[CellJob], dataset_dir: Path, *, progress: bool = True,
                   say: Callable[[str], None] = print, cores: int = 1) -> list[int]:
    """:func:`prepare_split` for every split other than ``data.split`` that ``jobs`` train on, before
    any cell runs (see the module's docstring for why); returns those splits.

    With ``train.threads`` 0 each pre-training takes every core, so they run one after the other,
    in split order. With ``train.threads`` fixed (e.g. 1, the verdict preset's), a pre-training
    uses only those threads whatever runs beside it (the same bits), so ``cores // train.threads``
    of them run at once in spawned processes (:func:`pipeline.jobs.run_parallel`, no progress
    bars there): three extra splits at one thread each took 3 x 6.7 min one after the other on 2
    cores, leaving a core idle."""
    todo: dict[int, CellJob] = {}
    for j in jobs:
        if j.key_split is not None:
            todo.setdefault(j.key_split, j)
    order = sorted(todo)
    at_once = min(len(order), cores // main.train.threads) if main.train.threads else 1
    if at_once > 1:
        from .jobs import run_parallel
        say(f"pre-training splits {', '.join(map(str, order))}: {at_once} at a time, "
            f"{main.train.threads} torch thread{'s' if main.train.threads > 1 else ''} each")
        run_parallel(_prepare_split_job, [(main, k, Path(dataset_dir), todo[k].split_dir, todo[k].init)
                                          for k in order], at_once)
        return order
    for k in order:
        prepare_split(main, k, dataset_dir, todo[k].split_dir, todo[k].init, progress=progress, say=say)
    return order


def _prepare_split_job(job: tuple) -> bool:
    """:func:`prepare_split` in a pool worker (module level: spawned processes unpickle it)."""
    main, split, dataset_dir, split_dir, init = job
    return prepare_split(main, split, dataset_dir, split_dir, init, progress=False,
                         say=lambda m: print(m, flush=True))


def run_cells(jobs: list[CellJob], workers: int, on_done: Callable[[CellJob, dict], None] | None = None,
              grid: AblationConfig | None = None, folder: Path | None = None) -> list[dict]:
    """:func:`run_cell` for every job; results in job order, ``on_done(job, result)`` here as each ends.

    ``ablation.executor: local`` (or no ``grid``): ``workers`` at a time in spawned processes
    (:func:`pipeline.jobs.run_parallel`; the first failure stops the others). ``slurm``: one job
    array through submitit, its files under ``folder`` (:func:`pipeline.executor.run_cells_slurm`).
    """
    if grid is not None and grid.executor == "slurm":
        from .executor import run_cells_slurm
        if folder is None:
            raise ValueError("the Slurm executor needs a folder on the shared filesystem for its job files")
        return run_cells_slurm(jobs, grid.slurm, folder, on_done)
    from .jobs import run_parallel
    return run_parallel(run_cell, jobs, workers, on_done)


def log_gathered_cell(job: CellJob, *, tags: Mapping[str, str] | None = None, phash: str | None = None,
                      experiment: str | None = None, name: str | None = None, executor: str = "slurm",
                      record: bool = True) -> str | None:
    """Log a cell that ran elsewhere (a Slurm node, ``job.mlflow`` False) to MLflow from here, from
    its outputs in ``job.out``: what :func:`run_cell` logs itself (params, the training curve, the
    model, the metrics, the held-out AUCs and tags), into the run of its params hash. Running it again
    logs nothing twice: metrics are logged last, and a run that has them all is left as it is. A
    finished run of these params that recorded other metrics stays as it is and the cell gets a new run
    (tagged ``differs_from_run_id``), like :func:`run_cell`. The run id is written into cell.json
    (``record``). Returns the run id.

    An offline bundle (:mod:`pipeline.offline`) logs its cells here too: ``tags`` (provenance) are
    added, ``phash`` (the run's ``params_hash`` tag: the bundle's own, so that no run of this store is
    reopened), ``experiment``, ``name`` and the tag ``executor`` replace the defaults; a cell folder
    without ``model.pt`` logs no model, and one whose dataset is not here logs the file as an artifact."""
    import contextlib
    import math

    import pandas as pd

    from .data.dataset import input_example
    from .io import read_json, write_json
    from .tracking import metric_key, open_tracker

    cell = read_json(job.out / "cell.json")
    metrics = {k: v for k, v in read_json(job.out / "metrics.json").items() if v is not None}
    metrics.update({k: v for k, v in (cell.get("heldout") or {}).items() if v is not None})   # as run_cell logs them
    facts = {k: v for k, v in cell.items() if k not in ("variant", "seed", "params_hash", "shared_with_main",
                                                        "iterations", "torch_threads", "run_id", "heldout")}
    tags = {"stage": "ablate", "variant": job.variant, "seed": str(job.seed), "split": str(job.params.data.split),
            **(tags or {})}
    name = name or job.run_name
    where = {"phash": phash, "experiment": experiment or job.experiment()}
    with contextlib.ExitStack() as runs:
        tracker = runs.enter_context(open_tracker(job.params, job.params_text, tags, name, include_finished=True,
                                                  **where))
        logged = tracker.client.get_run(tracker.run_id).data.metrics
        if any(metric_key(k) in logged and logged[metric_key(k)] != v for k, v in metrics.items()):
            old = tracker.run_id
            tracker = runs.enter_context(open_tracker(job.params, job.params_text,
                                                      {**tags, "differs_from_run_id": old}, name, **where))
            logged = {}
            print(f"cell {job.key}: the finished MLflow run {old} of these params recorded other metrics; "
                  f"logging to a new run {tracker.run_id}")
        missing = {k: v for k, v in metrics.items() if metric_key(k) not in logged}
        if missing:
            if not job.shared and len(missing) == len(metrics):      # nothing of this cell logged yet
                curve = job.out / "curve.csv"
                history = pd.read_csv(curve).to_dict("records") if curve.stat().st_size > 1 else []
                for rec in history:
                    step = rec.get("step")
                    tracker.log_metrics({k: v for k, v in rec.items() if k != "step"},
                                        step=None if step is None or math.isnan(step) else int(step))
                tracker.set_tags({"torch_threads": str(cell.get("torch_threads") or "default"),
                                  "executor": executor})
                model = job.out / "model.pt"
                if model.is_file() and (job.split_dir / "index.json").is_file():
                    tracker.log_model(model, input_example(job.dataset_dir, read_json(job.split_dir / "index.json")))
                elif model.is_file():
                    tracker.log_artifact(model, "model")
            tracker.set_tags({"variant": job.variant, "seed": str(job.seed), "split": tags["split"],
                              **{f"eval.{k}": v for k, v in facts.items()}})
            tracker.log_metrics(missing)
        run_id = tracker.run_id
    if record and cell.get("run_id") != run_id:
        write_json(job.out / "cell.json", {**cell, "run_id": run_id})
    return run_id


def run_cell(job: CellJob) -> dict:
    """Train (or reuse) and evaluate one cell; write ``job.out``; log to MLflow. Returns the
    summary (:data:`RESULT_KEYS`, ``seconds``, ``shared``)."""
    from .data.dataset import input_example
    from .engine.checkpoint import load_checkpoint
    from .engine.device import resolve_device
    from .engine.diagnostics import diagnostics_hook
    from .engine.evaluate import evaluate_model, load_trained
    from .engine.heldout import HELDOUT_SEED, HeldoutPairs, load_simnet
    from .engine.metrics import SUMMARY_KEYS
    from .engine.pretrain import load_init
    from .engine.train import export_model, train
    from .io import atomic_dir, read_json, write_csv, write_eval_outputs, write_json
    from .jobs import CoreShare
    from .tracking import (DatasetRef, log_evaluation, log_trained_model, metric_key, novel_mask_tags, open_tracker,
                           training_callbacks)

    start = time.perf_counter()
    p, variant, seed, shared = job.params, job.variant, job.seed, job.shared
    split, index = read_json(job.split_dir / "split.json"), read_json(job.split_dir / "index.json")
    job.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tags = {"stage": "ablate", "variant": variant, "seed": str(seed), "split": str(p.data.split),
            **novel_mask_tags(p)}
    phash, name, experiment = params_hash(p), job.run_name, job.experiment()
    # only an evaluation (shared cell, finished checkpoint) may reopen a finished run; a training gets its own
    evaluation_only = shared or finished_checkpoint(job.checkpoint, phash, p.train.iterations)
    tracker = (open_tracker(p, job.params_text, tags, name, include_finished=evaluation_only, experiment=experiment)
               if job.mlflow else None)
    reopened = tracker is not None and tracker.status == "FINISHED"
    # FINISHED on success, FAILED on an error, KILLED on Ctrl-C / SIGTERM (RunTracker.__exit__)
    dataset = DatasetRef.of_folder(p.data.dataset, job.dataset_dir) if tracker else None
    with contextlib.ExitStack() as runs, CoreShare(job.threads) as cores:
        if tracker:
            runs.enter_context(tracker)
            if not reopened:                 # a training (or a new run of a shared cell): its data and machine
                tracker.log_dataset(dataset)
                if not shared:
                    tracker.start_system_metrics()
        if shared:
            device = resolve_device(p.eval.device, "eval.device")
            model, _, _ = load_trained(job.main_model, device)
            main_ck = load_checkpoint(job.main_model)
            history, simnet = main_ck.get("history", []), load_simnet(main_ck)
            print(f"cell {job.key} shares the main training: reusing {job.main_model}")
        else:
            device = resolve_device(p.train.device)
            model, result = train(p, job.dataset_dir, split, index, job.checkpoint,
                                  **training_callbacks(None if reopened else tracker, cores, p),
                                  progress=job.progress, init=load_init(job.init, p.model.pretrained),
                                  diagnostics=diagnostics_hook(p.train.diagnostics_interval, split, p.base.seed,
                                                               p.loss.oracle))
            history, simnet = result.history, result.simnet
            if result.resumed_from:
                print(f"cell {job.key}: resumed from its checkpoint at step {result.resumed_from}", flush=True)
        model.eval()
        # the same fixed test pixel pairs for every cell (pipeline/engine/heldout.py), gathered from the
        # evaluation's own forward passes
        pairs = HeldoutPairs(job.dataset_dir, index, split, HELDOUT_SEED, short_edge=p.data.test_short_edge,
                             max_edge=p.data.test_max_edge, max_images=p.eval.max_images)
        with pairs.capture(model):
            summary, per_class, _ = evaluate_model(model, job.dataset_dir, index, split, p, device,
                                                   progress=job.progress)
        metrics = {k: v for k, v in summary.items() if k in SUMMARY_KEYS}
        heldout = pairs.score(simnet, model, device)
        heldout_log = heldout
        if reopened:
            logged = tracker.client.get_run(tracker.run_id).data.metrics
            if any(logged.get(metric_key(k), v) != v for k, v in metrics.items()):
                # not the result that run recorded: it stays as it is, and this result gets a run of its own
                old = tracker.run_id
                tracker = runs.enter_context(open_tracker(p, job.params_text, {**tags, "differs_from_run_id": old},
                                                          name, experiment=experiment))
                reopened = False
                tracker.log_dataset(dataset)
                print(f"cell {job.key}: the finished MLflow run {old} of these params recorded other metrics; "
                      f"logging to a new run {tracker.run_id}")
                for rec in history:                  # the curve of the checkpoint's own training
                    tracker.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=rec.get("step"))
            else:
                metrics = {k: v for k, v in metrics.items() if metric_key(k) not in logged}
                heldout_log = {k: v for k, v in heldout.items() if metric_key(k) not in logged}
        with atomic_dir(job.out) as tmp:
            facts = write_eval_outputs(tmp / "metrics.json", tmp / "per_class_iou.csv", summary, per_class)
            write_json(tmp / "cell.json", {"variant": variant, "seed": seed, "params_hash": phash,
                                           "shared_with_main": shared, "iterations": p.train.iterations,
                                           "torch_threads": cores.used[-1] if cores.used else None, **facts,
                                           "run_id": tracker.run_id if tracker else None,
                                           **({"diagnostic": tags["diagnostic"]} if "diagnostic" in tags else {}),
                                           "heldout": {k: (None if v != v else v) for k, v in heldout.items()}})
            write_csv(tmp / "curve.csv", history)
            if not shared:
                export_model(model, p, split, tmp / "model.pt", history, simnet)
        if tracker:
            tracker.set_tags({"variant": variant, "seed": str(seed), "split": tags["split"]})
            info = None
            if not shared and not reopened:      # the model first: the metrics below link to it
                info = log_trained_model(tracker, job.out / "model.pt", input_example(job.dataset_dir, index), cores,
                                         register=False)
            log_evaluation(tracker, metrics, dataset, getattr(info, "model_id", None))
            tracker.log_metrics(heldout_log)
            tracker.set_tags({f"eval.{k}": v for k, v in facts.items()})
    return {k: summary[k] for k in RESULT_KEYS} | {"seconds": time.perf_counter() - start, "shared": shared,
                                                    "heldout": heldout}
