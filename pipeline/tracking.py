"""MLflow tracking: one SQLite store per repository, one experiment per dataset and split.

Store layout
------------
* Root (:func:`store_root`): ``$DVC_ROOT`` when set (DVC points it at the real repository
  root also for ``dvc exp run --temp`` / queued runs, which execute inside
  ``.dvc/tmp/exps/...``), else the git top level of the working directory, else the
  working directory.
* Metadata: ``<root>/mlflow.db`` (``sqlite:////abs/path/mlflow.db``, :func:`tracking_uri`).
* Artifacts: ``<root>/mlartifacts/<experiment name>/<run id>/artifacts``. Experiments are
  created with this explicit absolute ``artifact_location``: MLflow's relative default
  (``./mlruns``) would land inside the temporary run folder and vanish with it.
  View with ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` from the repository root.

Runs
----
:class:`RunTracker` tags every run with ``params_hash`` (``pipeline.config.params_hash``).
``start(..., resume=True)`` reopens the newest run of the experiment with the same hash
that is not FINISHED (a crashed, failed or killed training resuming from its checkpoint)
instead of opening a duplicate (``include_finished=True`` also reopens a FINISHED run: the
evaluate stage logs onto its training run); params and tags already logged are left alone
(MLflow forbids changing a logged param), only missing ones are added. A new run gets all flattened params
(batches of at most 100), the params file text as artifact ``params.yaml`` and the tags
``git_commit``, ``dvc_exp_name``, ``params_hash`` plus the caller's.

Errors (decision)
-----------------
* Store open errors **fail before training starts**: the training stage calls
  :meth:`RunTracker.start` before any work, and a store that is missing, not a file,
  unwritable, or locked for longer than ``timeout`` seconds raises :class:`TrackingError`
  naming the store path and the cause. The store is probed with ``sqlite3`` first, so the
  failure is immediate rather than after MLflow's ~100 s engine-retry loop.
* After a successful start, a logging call that fails (e.g. the database briefly locked by
  a concurrent run) is retried a few times; then, with ``strict=False`` (default), it is
  reported through ``logging`` and recorded in ``RunTracker.failures`` and training goes
  on (the DVC outputs - ``reports/*.csv|json``, checkpoints - are the record of truth;
  MLflow is the index over them). With ``strict=True`` it raises :class:`TrackingError`.
* Used as a context manager, the run ends FINISHED on normal exit, FAILED on an exception
  and KILLED on ``KeyboardInterrupt``; both FAILED and KILLED runs are resumable.

MLflow is imported lazily inside functions only: ``pipeline`` imports without MLflow (the GPU
machine has none); only calling into this module needs it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
INIT_LOCK_NAME = "mlflow.db-init.lock"  # matched by .gitignore's /mlflow.db-*
PARAMS_CHUNK = 100
METRICS_CHUNK = 1000
PARAM_VALUE_MAX = 6000
UNFINISHED = ("RUNNING", "SCHEDULED", "FAILED", "KILLED")
_RETRY_SLEEPS = (0.2, 0.5, 1.0)


class TrackingError(RuntimeError):
    """The MLflow store cannot be opened or written."""


# ---------------------------------------------------------------- paths and names

def store_root(cwd: str | os.PathLike | None = None) -> Path:
    """``$DVC_ROOT`` if set, else the git top level of ``cwd``, else ``cwd`` (absolute)."""
    env = os.environ.get("DVC_ROOT", "").strip()
    if env:
        return Path(env).expanduser().resolve()
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    try:
        out = subprocess.run(["git", "-C", str(cwd), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return Path(out.stdout.strip()).resolve()
    except (OSError, subprocess.SubprocessError):
        pass
    return cwd.resolve()


def db_path(root: str | os.PathLike) -> Path:
    return Path(root).resolve() / DB_NAME


def artifact_root(root: str | os.PathLike) -> Path:
    return Path(root).resolve() / ARTIFACTS_DIR


def tracking_uri(root: str | os.PathLike) -> str:
    """``sqlite:///<absolute root>/mlflow.db`` (four slashes for an absolute POSIX path)."""
    return f"sqlite:///{db_path(root).as_posix()}"


def experiment_name(dataset: str, split: int | str) -> str:
    return f"simformer-{dataset}-split{split}"


def git_commit(root: str | os.PathLike) -> str:
    """``git rev-parse HEAD`` at ``root``; ``"unknown"`` outside a repository or without git."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else "unknown"


# ---------------------------------------------------------------- store access

def _probe_store(root: Path, timeout: float) -> Path:
    """Open the SQLite file directly and take (then release) a write lock: fast, clear errors."""
    db = db_path(root)
    if not root.is_dir():
        raise TrackingError(f"MLflow store {db} is unreachable: the store folder {root} does not exist "
                            "(set DVC_ROOT or run from inside the repository)")
    if db.exists() and not db.is_file():
        raise TrackingError(f"MLflow store {db} cannot be opened: the path exists but is not a regular file")
    conn = None
    try:
        conn = sqlite3.connect(str(db), timeout=timeout, isolation_level=None)
        conn.execute("PRAGMA schema_version").fetchone()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    except sqlite3.Error as e:
        cause = str(e)
        if "locked" in cause:
            cause += f" (another process held the database for more than {timeout:g} s)"
        raise TrackingError(f"MLflow store {db} cannot be opened: {cause}") from e
    finally:
        if conn is not None:
            conn.close()
    return db


@contextlib.contextmanager
def _init_lock(root: Path):
    """Serialise store creation/migration and experiment creation between processes."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    try:
        fh = open(root / INIT_LOCK_NAME, "a+")
    except OSError:
        yield
        return
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


def _quiet_store_logs() -> None:
    for name in ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def open_client(root: str | os.PathLike, timeout: float = 30.0):
    """``mlflow.MlflowClient`` on the store at ``root`` (created on first use).

    Raises :class:`TrackingError` naming the store path when it cannot be opened.
    """
    root = Path(root).resolve()
    try:
        from mlflow import MlflowClient
    except ImportError as e:
        raise TrackingError(f"MLflow store {db_path(root)} cannot be opened: mlflow is not installed ({e})") from e
    db = _probe_store(root, timeout)
    _quiet_store_logs()
    try:
        with _init_lock(root):
            return MlflowClient(tracking_uri=tracking_uri(root))
    except Exception as e:  # noqa: BLE001 - any store failure is reported the same way
        raise TrackingError(f"MLflow store {db} cannot be opened: {type(e).__name__}: {e}") from e


def _experiment_id(client, root: Path, name: str, create: bool) -> str | None:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted" and create:
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    if not create:
        return None
    location = (artifact_root(root) / name).as_uri()
    with _init_lock(root):
        exp = client.get_experiment_by_name(name)  # another process may have made it meanwhile
        if exp is not None:
            return exp.experiment_id
        return client.create_experiment(name, artifact_location=location)


def _quote(s: str) -> str:
    return "'" + str(s).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _search(client, exp_id: str, params_hash: str, statuses: Iterable[str] | None):
    flt = f"tags.params_hash = {_quote(params_hash)}"
    runs = client.search_runs([exp_id], filter_string=flt, order_by=["attributes.start_time DESC"],
                              max_results=1000)
    if statuses is not None:
        wanted = {s.upper() for s in statuses}
        runs = [r for r in runs if r.info.status in wanted]
    return runs


def find_run(root: str | os.PathLike, experiment: str, params_hash: str,
             status: str | Iterable[str] | None = None, timeout: float = 30.0) -> str | None:
    """Newest run id of ``experiment`` tagged ``params_hash`` (optionally with one of the given
    MLflow statuses, e.g. ``"FINISHED"``), or ``None``."""
    client = open_client(root, timeout)
    try:
        exp_id = _experiment_id(client, Path(root).resolve(), experiment, create=False)
        if exp_id is None:
            return None
        statuses = [status] if isinstance(status, str) else status
        runs = _search(client, exp_id, params_hash, statuses)
    except Exception as e:  # noqa: BLE001
        raise TrackingError(f"MLflow store {db_path(root)}: searching runs failed: {type(e).__name__}: {e}") from e
    return runs[0].info.run_id if runs else None


# ---------------------------------------------------------------- run tracker

def _param_value(v: Any) -> str:
    s = "" if v is None else str(v)
    if len(s) > PARAM_VALUE_MAX:
        log.warning("param value truncated to %d characters", PARAM_VALUE_MAX)
        s = s[:PARAM_VALUE_MAX]
    return s


def _chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


class RunTracker:
    """One MLflow run of one stage execution::

        with RunTracker(store_root(), experiment_name("synthetic", 1)) as tr:
            tr.start(params_hash(p), "train", flatten(to_dict(p)), params_text, {"stage": "train"})
            ... tr.log_metrics({"loss": 0.5}, step=10) ...
        # FINISHED on normal exit, FAILED on exception, KILLED on KeyboardInterrupt
    """

    def __init__(self, root: str | os.PathLike, experiment: str, *, timeout: float = 30.0, strict: bool = False):
        self.root = Path(root).resolve()
        self.experiment = experiment
        self.timeout = float(timeout)
        self.strict = strict
        self.client = None
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.resumed = False
        self.status: str | None = None
        self.failures: list[str] = []

    # -- lifecycle
    def start(self, params_hash: str, run_name: str, params_flat: Mapping[str, Any], params_yaml_text: str,
              tags: Mapping[str, Any] | None = None, resume: bool = True, include_finished: bool = False) -> str:
        """Open (or resume) the run and return its id; raises :class:`TrackingError` when the
        store cannot be opened or written (call it before any expensive work).

        ``resume``: reopen the newest run with this ``params_hash`` that is not FINISHED;
        ``include_finished`` also reopens a FINISHED one (the evaluate stage logging onto its
        training run). A resumed run keeps its params and tags; only missing ones are added,
        ``resume_count`` is incremented and a changed commit is recorded as ``git_commit_resumed``.
        """
        if not params_hash:
            raise ValueError("params_hash must be a non-empty string")
        self.client = open_client(self.root, self.timeout)
        client = self.client
        base_tags = {
            "git_commit": git_commit(self.root),
            "dvc_exp_name": os.environ.get("DVC_EXP_NAME") or "workspace",
            "params_hash": str(params_hash),
        }
        if os.environ.get("DVC_EXP_BASELINE_REV"):
            base_tags["dvc_exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
        all_tags = {**base_tags, **{str(k): str(v) for k, v in (tags or {}).items()}}
        all_tags["params_hash"] = str(params_hash)
        all_tags.setdefault("mlflow.source.git.commit", base_tags["git_commit"])
        params = {str(k): _param_value(v) for k, v in params_flat.items()}
        try:
            from mlflow.entities import Param, RunTag

            self.experiment_id = _experiment_id(client, self.root, self.experiment, create=True)
            existing = None
            if resume:
                runs = _search(client, self.experiment_id, params_hash, None if include_finished else UNFINISHED)
                existing = runs[0] if runs else None
            if existing is not None:
                run_id = existing.info.run_id
                client.update_run(run_id, status="RUNNING")
                logged = existing.data.params
                changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
                if changed:
                    log.warning("resumed MLflow run %s keeps its logged values of %s", run_id, ", ".join(changed))
                missing = [Param(k, v) for k, v in params.items() if k not in logged]
                for chunk in _chunks(missing, PARAMS_CHUNK):
                    client.log_batch(run_id, params=chunk)
                old_tags = existing.data.tags
                resume_tags = {k: v for k, v in all_tags.items() if k not in old_tags}
                resume_tags["resume_count"] = str(int(old_tags.get("resume_count", "0") or 0) + 1)
                if old_tags.get("git_commit", base_tags["git_commit"]) != base_tags["git_commit"]:
                    resume_tags["git_commit_resumed"] = base_tags["git_commit"]
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in resume_tags.items()])
                if "params.yaml" not in {f.path for f in client.list_artifacts(run_id)}:
                    client.log_text(run_id, params_yaml_text, "params.yaml")
                self.resumed = True
            else:
                run = client.create_run(self.experiment_id, tags=all_tags, run_name=run_name)
                run_id = run.info.run_id
                for chunk in _chunks([Param(k, v) for k, v in params.items()], PARAMS_CHUNK):
                    client.log_batch(run_id, params=chunk)
                client.log_text(run_id, params_yaml_text, "params.yaml")
                self.resumed = False
        except TrackingError:
            raise
        except Exception as e:  # noqa: BLE001
            raise TrackingError(f"MLflow store {db_path(self.root)}: starting a run in experiment "
                                f"'{self.experiment}' failed: {type(e).__name__}: {e}") from e
        self.run_id = run_id
        self.status = "RUNNING"
        return run_id

    def _require_run(self) -> None:
        if self.run_id is None or self.client is None:
            raise RuntimeError("RunTracker.start() has not been called")

    def _call(self, what: str, fn, *args, **kwargs) -> bool:
        """Run a store call with retries; on final failure raise (strict) or warn and record."""
        last = None
        for sleep in (*_RETRY_SLEEPS, None):
            try:
                fn(*args, **kwargs)
                return True
            except Exception as e:  # noqa: BLE001
                last = e
                if sleep is not None:
                    time.sleep(sleep)
        msg = f"MLflow store {db_path(self.root)}: {what} failed for run {self.run_id}: {type(last).__name__}: {last}"
        if self.strict:
            raise TrackingError(msg) from last
        log.warning("%s (continuing; the DVC outputs remain the record)", msg)
        self.failures.append(msg)
        return False

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric values (``None`` and non-numbers are skipped; NaN is logged as NaN)."""
        self._require_run()
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            if v is None or isinstance(v, (str, bytes)):
                continue
            try:
                fv = float(v)
            except (TypeError, ValueError):
                continue
            if math.isinf(fv):
                continue
            items.append(Metric(str(k), fv, ts, int(step or 0)))
        for chunk in _chunks(items, METRICS_CHUNK):
            self._call("log_metrics", self.client.log_batch, self.run_id, metrics=chunk)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file (or every file of a folder) into the run's artifacts."""
        self._require_run()
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {path}")
        fn = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        self._call(f"log_artifact({path})", fn, self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._require_run()
        from mlflow.entities import RunTag

        self._call("set_tags", self.client.log_batch, self.run_id,
                   tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with an MLflow status (FINISHED, FAILED or KILLED); idempotent."""
        status = status.upper()
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
        if self.run_id is None or self.status in ("FINISHED", "FAILED", "KILLED"):
            return
        if self._call(f"finish({status})", self.client.set_terminated, self.run_id, status):
            self.status = status

    # -- context manager
    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.run_id is not None:
            if exc_type is None:
                status = "FINISHED"
            elif issubclass(exc_type, KeyboardInterrupt):
                status = "KILLED"
            else:
                status = "FAILED"
            try:
                self.finish(status)
            except TrackingError:
                if exc_type is None:
                    raise
                log.exception("could not mark MLflow run %s %s", self.run_id, status)
        return False


def sync_grid(root: str | os.PathLike, experiment: str, grid_id: str, grid_params: Mapping[str, Any],
              cells: list[dict], params_yaml_text: str, artifacts: Iterable[str | os.PathLike] = ()) -> dict:
    """One parent run per ablation grid, one child run per cell.

    ``cells``: dicts with ``variant``, ``seed``, ``params_hash``, ``params_flat`` and ``metrics``.
    Each cell's run is looked up by its params hash (the cell stage's own run, or the main
    training's for the shared cell); a cell restored by a DVC run-cache hit has none in
    this store, so it is created here from the cell's saved metrics. Running again finds
    every run and creates nothing. Returns ``{"parent": run_id, "children": {key: run_id}}``.
    """
    parent = RunTracker(root, experiment)
    parent.start(f"grid-{grid_id}", f"ablation-grid-{grid_id[:8]}", grid_params, params_yaml_text,
                 tags={"role": "ablation_grid", "grid_id": grid_id}, include_finished=True)
    children = {}
    for cell in cells:
        tr = RunTracker(root, experiment)
        tags = {"variant": cell["variant"], "seed": str(cell["seed"]), "mlflow.parentRunId": parent.run_id,
                "grid_id": grid_id}
        tr.start(cell["params_hash"], f"{cell['variant']}-seed{cell['seed']}-{cell['params_hash'][:8]}",
                 cell["params_flat"], params_yaml_text, tags={**tags, "stage": "ablate"}, include_finished=True)
        tr.set_tags(tags)
        if not tr.resumed:      # created here: a run-cache hit left this cell without a run
            tr.log_metrics({k: v for k, v in cell["metrics"].items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
            tr.set_tags({"restored_from": "dvc_run_cache"})
        tr.finish("FINISHED")
        children[f"{cell['variant']}-{cell['seed']}"] = tr.run_id
    for path in artifacts:
        parent.log_artifact(path, "report")
    parent.finish("FINISHED")
    return {"parent": parent.run_id, "children": children}


def search_runs_frame(root: str | os.PathLike, experiment: str, tags: Mapping[str, list[str]] | None = None):
    """``mlflow.search_runs`` of one experiment as a pandas DataFrame, filtered by tag values
    (several values of one tag are alternatives)."""
    import mlflow

    open_client(root)                                    # fails clearly on a missing / locked store
    mlflow.set_tracking_uri(tracking_uri(root))
    if mlflow.get_experiment_by_name(experiment) is None:
        raise TrackingError(f"MLflow store {db_path(root)} has no experiment '{experiment}'")
    df = mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.start_time DESC"])
    for key, values in (tags or {}).items():
        col = f"tags.{key}"
        df = df[df[col].isin(values)] if col in df else df.iloc[0:0]
    return df


def runs_table(df, metrics: list[str], group_by: str | None = None):
    """Run name, variant, seed, status and the chosen metrics; or mean/std/count per ``group_by`` tag."""
    import pandas as pd

    cols = {"tags.mlflow.runName": "run", "tags.variant": "variant", "tags.seed": "seed", "status": "status",
            "tags.params_hash": "params_hash"}
    out = pd.DataFrame({new: df[old] for old, new in cols.items() if old in df})
    for m in metrics:
        out[m] = df[f"metrics.{m}"] if f"metrics.{m}" in df else float("nan")
    if group_by is None or out.empty:
        return out.reset_index(drop=True)
    key = {"variant": "variant", "seed": "seed"}.get(group_by, group_by)
    if key not in out:
        out[key] = df.get(f"tags.{group_by}")
    return out.groupby(key)[metrics].agg(["mean", "std", "count"])
