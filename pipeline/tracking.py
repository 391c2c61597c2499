"""MLflow tracking: one store per repository, one experiment per dataset and split, one run per
trained thing (found again by its ``params_hash`` tag: resumed when unfinished, reopened to add
results, never moved nor re-finished). Store, root and artifact layout: docs/ARCHITECTURE.md
("MLflow"). A store that cannot be opened fails before any work (:class:`TrackingError`); a later
failure is warned about (the DVC outputs are the record, MLflow the index) or raised (``strict``).
MLflow is imported on use only.
"""
import contextlib
import logging
import math
import os
import re
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Mapping

from .repo import git_commit, store_root

log = logging.getLogger(__name__)
DB_NAME, ARTIFACTS_DIR = "mlflow.db", "mlartifacts"
INIT_LOCK_NAME = "mlflow.db-init.lock"  # matched by .gitignore's /mlflow.db-*


class TrackingError(RuntimeError):
    """The MLflow store cannot be opened or written."""


def _server() -> str:        # empty for the embedded store
    return os.environ.get("MLFLOW_TRACKING_URI", "").strip()


def tracking_uri(root) -> str:
    return _server() or f"sqlite:///{(Path(root).resolve() / DB_NAME).as_posix()}"


def _store_name(root) -> str:
    return _server() or str(Path(root).resolve() / DB_NAME)


def _from_root(root):        # MLflow resolves relative artifact locations from the working directory
    return contextlib.nullcontext() if _server() else contextlib.chdir(root)


def experiment_name(dataset: str, split: int | str) -> str:
    """Also the registered model's name."""
    return f"simformer-{dataset}-split{split}"


def run_name(base: str) -> str:
    """``base``, then the DVC experiment's name when there is one (never a hash)."""
    return f"{base}@{os.environ['DVC_EXP_NAME']}" if os.environ.get("DVC_EXP_NAME") else base


@contextlib.contextmanager
def _init_lock(root: Path):
    """Serialise creating the embedded store and its experiments between processes (a server needs none)."""
    with contextlib.ExitStack() as stack:
        if not _server():
            import fcntl
            fcntl.flock(stack.enter_context(open(root / INIT_LOCK_NAME, "a+")), fcntl.LOCK_EX)
        yield


def open_client(root, timeout: float = 30.0):
    """``mlflow.MlflowClient`` on the store of ``root`` (the embedded one is created on first use).
    The SQLite file is probed (a write lock taken and released) first: a clear error now."""
    root = Path(root).resolve()
    db, fail = root / DB_NAME, f"MLflow store {_store_name(root)} cannot be opened: "
    try:
        from mlflow import MlflowClient
    except ImportError as e:
        raise TrackingError(f"{fail}mlflow is not installed ({e})") from e
    try:
        if not _server():
            with contextlib.closing(sqlite3.connect(str(db), timeout=timeout, isolation_level=None)) as conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
        for name in ("alembic", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
        with _init_lock(root):
            client = MlflowClient(tracking_uri=tracking_uri(root))
            client.search_experiments(max_results=1)             # fails now, not mid-training
            return client
    except Exception as e:  # noqa: BLE001 - any store failure is reported the same way, with its likely cause
        why = ("" if _server() else
               f" (the store folder {root} does not exist: set DVC_ROOT or run from inside the repository)"
               if not root.is_dir() else " (the path exists but is not a regular file)" if db.is_dir() else
               f" (another process held the database for more than {timeout:g} s)" if "locked" in str(e) else "")
        raise TrackingError(f"{fail}{type(e).__name__}: {e}{why}") from e


@contextlib.contextmanager
def using_store(root):
    """MLflow's fluent API (``mlflow.pyfunc.load_model``, ``mlflow.search_runs``) on the store of ``root``, from
    the root; restores the URI, ``$MLFLOW_TRACKING_URI`` (set for child processes) and the working directory."""
    import mlflow
    before, uri = os.environ.get("MLFLOW_TRACKING_URI"), tracking_uri(root)
    with _from_root(root):
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(before)


def find_runs(client, exp_id: str, filters: Mapping[str, str]) -> list:
    """Active runs of the experiment whose tags equal ``filters`` (ids or hashes: not escaped), newest first."""
    return client.search_runs([exp_id], " and ".join(f"tags.`{k}` = '{v}'" for k, v in filters.items()),
                              order_by=["attributes.start_time DESC"], max_results=1000)


def metric_key(name: str) -> str:
    """``name`` as an MLflow metric / param key (``+complementary`` -> ``plus_complementary``)."""
    return re.sub(r"[^\w.\- /:]", "_", str(name).replace("+", "plus_"))


def metric_entities(metrics: Mapping[str, Any], step: int | None = None) -> list:
    """MLflow ``Metric`` entities of the finite numbers in ``metrics`` (None, strings, bools skipped)."""
    from mlflow.entities import Metric
    from mlflow.utils.time import get_current_time_millis
    ts = get_current_time_millis()
    return [Metric(metric_key(k), float(v), ts, int(step or 0)) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


class RunTracker(contextlib.AbstractContextManager):
    """One MLflow run of one stage execution (:meth:`start`; use: :func:`open_tracker`), ended FINISHED,
    FAILED on an exception, KILLED on KeyboardInterrupt (a reopened FINISHED run is left as it was)."""

    def __init__(self, root, experiment: str, *, timeout: float = 30.0, strict: bool = False):
        self.root, self.experiment, self.timeout, self.strict = Path(root).resolve(), experiment, timeout, strict
        self.client = self.experiment_id = self.run_id = self.status = None

    def _experiment(self) -> str:
        """The experiment's id, created (or restored) when needed; in the embedded store with its artifact
        folder ``mlartifacts/<name>`` relative to the root (MLflow would record an absolute path)."""
        client, name = self.client, self.experiment
        with _init_lock(self.root):          # a server has no lock: a concurrent creation is looked up again
            exp = client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    client.restore_experiment(exp.experiment_id)
                return exp.experiment_id
            location = None if _server() else (self.root / ARTIFACTS_DIR / name).as_uri()
            try:                             # the UI opens on the runs table
                eid = client.create_experiment(name, location, {"mlflow.experimentKind": "custom_model_development"})
            except Exception:  # noqa: BLE001
                if (exp := client.get_experiment_by_name(name)) is None:
                    raise
                return exp.experiment_id
            if location:
                with contextlib.closing(sqlite3.connect(str(self.root / DB_NAME), timeout=30)) as conn, conn:
                    conn.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                                 (f"{ARTIFACTS_DIR}/{name}", int(eid)))
            return eid

    def start(self, params_hash: str, run_name: str, params_flat: Mapping[str, Any], params_yaml_text: str,
              tags: Mapping[str, Any] | None = None, include_finished: bool = False) -> str:
        """Create, resume or reopen the run and return its id; call it before any expensive work. A found
        run keeps its logged params (MLflow forbids changing them) and gets the missing ones."""
        self.client = client = open_client(self.root, self.timeout)
        commit, baseline = git_commit(self.root), os.environ.get("DVC_EXP_BASELINE_REV")
        all_tags = {"git_commit": commit, "mlflow.source.git.commit": commit,
                    "dvc_exp_name": os.environ.get("DVC_EXP_NAME") or "workspace",
                    **({"dvc_exp_baseline_rev": baseline} if baseline else {}),
                    **{str(k): str(v) for k, v in (tags or {}).items()}, "params_hash": str(params_hash)}
        params = {str(k): "" if v is None else str(v) for k, v in params_flat.items()}
        try:
            from mlflow.entities import Param, RunTag
            self.experiment_id = self._experiment()
            runs = find_runs(client, self.experiment_id, {"params_hash": params_hash})
            found = next((r for r in runs if include_finished or r.info.status != "FINISHED"), None)
            # a new run is created with its tags (found again by its params hash even if the next steps fail)
            run = found or client.create_run(self.experiment_id, tags=all_tags, run_name=run_name)
            self.run_id, self.status, old, old_tags = run.info.run_id, run.info.status, run.data.params, run.data.tags
            changed = sorted(k for k, v in params.items() if old.get(k, v) != v)
            if changed:
                log.warning("MLflow run %s keeps its logged values of %s", self.run_id, ", ".join(changed))
            new_tags = {k: v for k, v in all_tags.items() if k not in old_tags}
            if self.status != "FINISHED" and found is not None:     # resumed (a FINISHED one is only reopened)
                client.update_run(self.run_id, status="RUNNING")
                self.status = "RUNNING"
                new_tags["resume_count"] = str(int(old_tags.get("resume_count") or 0) + 1)
                if old_tags.get("git_commit", commit) != commit:
                    new_tags["git_commit_resumed"] = commit
            client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items() if k not in old],
                             tags=[RunTag(k, v) for k, v in new_tags.items()])
            with _from_root(self.root):
                if "params.yaml" not in [f.path for f in client.list_artifacts(self.run_id)]:
                    client.log_text(self.run_id, params_yaml_text, "params.yaml")
        except Exception as e:  # noqa: BLE001
            raise TrackingError(f"MLflow store {_store_name(self.root)}: starting a run in experiment "
                                f"'{self.experiment}' failed: {type(e).__name__}: {e}") from e
        return self.run_id

    def _call(self, what: str, fn, *args, fluent: bool = False, **kwargs) -> bool:
        """``fn`` from the root (``fluent``: in :func:`using_store`); on failure warned about, or raised when strict."""
        try:
            with using_store(self.root) if fluent else _from_root(self.root):    # callers pass absolute local paths
                fn(*args, **kwargs)
            return True
        except Exception as e:  # noqa: BLE001
            msg = f"MLflow store {_store_name(self.root)}: {what} failed for run {self.run_id}: {type(e).__name__}: {e}"
            if self.strict:
                raise TrackingError(msg) from e
            log.warning("%s (continuing; the DVC outputs remain the record)", msg)
            return False

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the finite numbers of ``metrics`` (None, strings and bools are skipped)."""
        self._call("log_metrics", self.client.log_batch, self.run_id, metrics=metric_entities(metrics, step))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag
        self._call("set_tags", self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        """Copy a file into the run's artifacts."""
        self._call(f"log_artifact({path})", self.client.log_artifact, self.run_id, str(Path(path).resolve()),
                   artifact_path)

    def log_model(self, model_file, example, registered_name: str | None = None) -> None:
        """The model file as an MLflow pyfunc model of this run (:mod:`pipeline.serving`), registered
        as ``registered_name`` when given."""
        from .serving import log_segmenter
        self._call("log_model", log_segmenter, self.client, self.experiment_id, self.run_id, Path(model_file).resolve(),
                   example, registered_name, fluent=True)

    def runs_url(self) -> str:
        """The UI page of this run's experiment's runs table (``make ui`` serves the embedded store)."""
        return f"{(_server() or 'http://127.0.0.1:5000').rstrip('/')}/#/experiments/{self.experiment_id}/runs"

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED; idempotent, and a no-op on a reopened run."""
        if self.status == "RUNNING" and self._call(f"finish({status})", self.client.set_terminated,
                                                   self.run_id, status):
            self.status = status

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        try:
            self.finish(status)
        except TrackingError:
            if exc_type is None:
                raise
            log.exception("could not mark MLflow run %s %s", self.run_id, status)


# ----------------------------------------------------------------------------- what the stages log

def open_tracker(p, params_text: str, tags: Mapping[str, Any], name: str, phash: str | None = None,
                 include_finished: bool = False, root=None) -> RunTracker:
    """Start, resume or reopen (by params hash) the MLflow run of the params ``p`` in the store of
    ``root`` (default: the repository's, :func:`pipeline.repo.store_root`); fails before any work
    when the store cannot be opened. ``params_text`` is logged as the run's params.yaml."""
    from .config import flatten, params_hash, to_dict
    tracker = RunTracker(root or store_root(), experiment_name(p.data.dataset, p.data.split))
    tracker.start(phash or params_hash(p), run_name(name), flatten(to_dict(p)), params_text, tags=tags,
                  include_finished=include_finished)
    return tracker


def novel_mask_tags(p) -> dict[str, str]:
    """``{"diagnostic": "uses novel masks (<what>)"}`` for a run whose training reads novel masks
    (:func:`pipeline.config.novel_mask_use`: the oracle teacher, the fully supervised oracle), else {}."""
    from .config import novel_mask_use
    use = novel_mask_use(p)
    return {"diagnostic": f"uses novel masks ({use})"} if use else {}


def training_callbacks(tracker: RunTracker | None, cores):
    """``on_log`` of the training loop: forward a step's record to MLflow and re-share the CPU
    cores among the trainings running (:class:`pipeline.jobs.CoreShare`)."""
    def on_log(step, rec):
        cores.rebalance()
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=step)
    return on_log


def log_trained_model(tracker: RunTracker | None, model_path, example_image, cores, register: bool) -> None:
    """The trained model as an MLflow model of the run (``example_image``: its input example),
    registered under the experiment's name when ``register``; and the torch threads the training
    used (tag ``torch_threads``)."""
    if tracker is None:
        return
    tracker.set_tags({"torch_threads": ",".join(map(str, cores.used)) or "default"})
    tracker.log_model(model_path, example_image, tracker.experiment if register else None)


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

    parent = RunTracker(root, experiment, strict=True)
    with parent:
        parent.start(f"grid-{grid_id}", run_name("ablation-grid"), grid_params, params_yaml_text,
                     tags={"role": "ablation_grid", "grid_id": grid_id,
                           "mlflow.note.content": f"Ablation grid {grid_id}: {len(cells)} cells"},
                     include_finished=True)
        client, exp_id = parent.client, parent.experiment_id
        children = {}
        for cell in cells:
            name = f"{cell['variant']}-seed{cell['seed']}"
            tags = {"variant": cell["variant"], "seed": str(cell["seed"]), "grid_id": grid_id,
                    "mlflow.parentRunId": parent.run_id}
            own = next(iter(find_runs(client, exp_id, {"params_hash": cell["params_hash"]})), None)
            if own is None or own.data.tags.get("mlflow.parentRunId") in (None, parent.run_id):
                with RunTracker(root, experiment, strict=True) as tr:
                    tr.start(cell["params_hash"], run_name(name), cell["params_flat"], cell["params_text"],
                             {"stage": "ablate", **tags}, include_finished=True)
                    tr.set_tags(tags)
                    if own is None:          # a run-cache hit left this cell without a run
                        tr.log_metrics(cell["metrics"])
                        tr.set_tags({"restored_from": "dvc_run_cache"})
                children[name] = tr.run_id
                continue
            link = next(iter(find_runs(client, exp_id, {"grid_id": grid_id, "linked_run_id": own.info.run_id})), None)
            if link is None:
                note = (f"Cached cell: trained in run {own.info.run_id} (grid {own.data.tags.get('grid_id', '?')}); "
                        "this run only links to it.")
                link = client.create_run(exp_id, run_name=run_name(name) + " (cached)",
                                         tags={**tags, "role": "cell_link", "linked_run_id": own.info.run_id,
                                               "cell_params_hash": cell["params_hash"], "mlflow.note.content": note})
                client.log_batch(link.info.run_id, metrics=metric_entities(cell["metrics"]),
                                 params=[Param(k, str(v)) for k, v in cell["params_flat"].items()])
                client.set_terminated(link.info.run_id, "FINISHED")
            children[name] = link.info.run_id
        logged = client.get_run(parent.run_id).data.metrics
        parent.log_metrics({k: v for k, v in grid_metrics.items() if logged.get(metric_key(k)) != v})
        for path in artifacts:
            parent.log_artifact(path, "report")
    return {"parent": parent.run_id, "children": children}
