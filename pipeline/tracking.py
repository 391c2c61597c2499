"""MLflow tracking: one store per repository, one experiment per dataset and split.

Store: ``$MLFLOW_TRACKING_URI`` when set (a shared ``mlflow server``, which keeps the
artifacts), else the embedded one at :func:`store_root` (``$DVC_ROOT``, which DVC sets also
for ``dvc exp run --temp`` / queued runs in ``.dvc/tmp/exps/...``; else the git top level):
``<root>/mlflow.db`` and ``<root>/mlartifacts/<experiment>/``. Experiments record that folder
relative to the root, so a moved or copied repository keeps its artifacts; MLflow resolves it
from the working directory, so artifacts are written, and read (:func:`using_store`,
``make ui``), from the root.

Runs, one per trained thing and never rewritten by a later one, are tagged ``params_hash``
(:func:`pipeline.config.params_hash`). :meth:`RunTracker.start` *resumes* the newest
unfinished run of the hash (crashed, failed, killed: RUNNING again, ``resume_count`` + 1) and,
with ``include_finished``, *reopens* a FINISHED one to add evaluation, leaving its status,
times and resume count alone. Logged params are kept (MLflow forbids changing them), missing
ones added. A new run gets the flattened params, the caller's ``params.yaml`` text (the run's
effective params) and the tags ``git_commit``, ``dvc_exp_name``, ``params_hash``. An ablation
grid's parent and children: :func:`pipeline.ablation.sync_grid`.

Errors: a store that cannot be opened raises :class:`TrackingError` naming it, before any
work (the SQLite file is probed first: no minutes of retries). Later a failing call is
retried, then warned about and recorded in ``RunTracker.failures`` (``strict=True`` raises):
the DVC outputs are the record of truth, MLflow the index. MLflow is imported on use only.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
INIT_LOCK_NAME = "mlflow.db-init.lock"  # matched by .gitignore's /mlflow.db-*
UNFINISHED = ("RUNNING", "SCHEDULED", "FAILED", "KILLED")
_RETRY_SLEEPS = (0.2, 0.5, 1.0)


class TrackingError(RuntimeError):
    """The MLflow store cannot be opened or written."""


# ---------------------------------------------------------------- where the store is

def store_root(cwd: str | os.PathLike | None = None) -> Path:
    """``$DVC_ROOT`` if set, else the git top level of ``cwd``, else ``cwd`` (absolute)."""
    env = os.environ.get("DVC_ROOT", "").strip()
    if env:
        return Path(env).expanduser().resolve()
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    top = _git(cwd, "rev-parse", "--show-toplevel")
    return Path(top).resolve() if top else cwd.resolve()


def db_path(root: str | os.PathLike) -> Path:
    return Path(root).resolve() / DB_NAME


def tracking_uri(root: str | os.PathLike) -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<absolute root>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI", "").strip() or f"sqlite:///{db_path(root).as_posix()}"


def _embedded() -> bool:
    return not os.environ.get("MLFLOW_TRACKING_URI", "").strip()


def _store_name(root: Path) -> str:
    return str(db_path(root)) if _embedded() else tracking_uri(root)


def experiment_name(dataset: str, split: int | str) -> str:
    """Also the registered model's name."""
    return f"simformer-{dataset}-split{split}"


def run_name(base: str) -> str:
    """Short run names: ``base``, then the DVC experiment's name when there is one (never a hash)."""
    exp = os.environ.get("DVC_EXP_NAME")
    return f"{base}@{exp}" if exp else base


def params_file_text(p, what: str) -> str:
    """The params a run used (:class:`pipeline.config.Params`) as a params file: a cell's or the
    retraining's ``params.yaml`` artifact."""
    import yaml

    from .config import to_dict
    return f"# effective params of {what}\n" + yaml.safe_dump(to_dict(p), sort_keys=False)


def _git(root, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def git_commit(root: str | os.PathLike) -> str:
    """``git rev-parse HEAD`` at ``root``; ``"unknown"`` outside a repository or without git."""
    return _git(root, "rev-parse", "HEAD") or "unknown"


# ---------------------------------------------------------------- store access

def _probe_store(root: Path, timeout: float) -> None:
    """Open the SQLite file directly and take (then release) a write lock: fast, clear errors."""
    db = db_path(root)
    if not root.is_dir():
        raise TrackingError(f"MLflow store {db} is unreachable: the store folder {root} does not exist "
                            "(set DVC_ROOT or run from inside the repository)")
    if db.exists() and not db.is_file():
        raise TrackingError(f"MLflow store {db} cannot be opened: the path exists but is not a regular file")
    try:
        with contextlib.closing(sqlite3.connect(str(db), timeout=timeout, isolation_level=None)) as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
    except sqlite3.Error as e:
        cause = str(e) + (f" (another process held the database for more than {timeout:g} s)"
                          if "locked" in str(e) else "")
        raise TrackingError(f"MLflow store {db} cannot be opened: {cause}") from e


@contextlib.contextmanager
def _init_lock(root: Path):
    """Serialise store creation and experiment creation between processes (POSIX flock)."""
    try:
        import fcntl
        fh = open(root / INIT_LOCK_NAME, "a+")
    except (ImportError, OSError):
        yield
        return
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield


def open_client(root: str | os.PathLike, timeout: float = 30.0):
    """``mlflow.MlflowClient`` on the store of ``root`` (the embedded one is created on first
    use); :class:`TrackingError` naming the store when it cannot be opened."""
    root = Path(root).resolve()
    try:
        from mlflow import MlflowClient
    except ImportError as e:
        raise TrackingError(f"MLflow store {_store_name(root)} cannot be opened: mlflow is not installed ({e})") from e
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        if not _embedded():
            client = MlflowClient(tracking_uri=tracking_uri(root))
            client.search_experiments(max_results=1)         # fails now, not mid-training
            return client
        _probe_store(root, timeout)
        with _init_lock(root):
            return MlflowClient(tracking_uri=tracking_uri(root))
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - any store failure is reported the same way
        raise TrackingError(f"MLflow store {_store_name(root)} cannot be opened: {type(e).__name__}: {e}") from e


def experiment_id(client, root: Path, name: str) -> str:
    """The experiment's id, created (or restored) when needed. In the embedded store its
    artifact location is ``mlartifacts/<name>``, relative to the root; MLflow itself would
    store an absolute path, so the row is rewritten right after creation."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    with _init_lock(root):
        exp = client.get_experiment_by_name(name)     # another process may have made it meanwhile
        if exp is not None:
            return exp.experiment_id
        # custom_model_development: the UI opens on the runs table, not the GenAI overview
        tags = {"mlflow.experimentKind": "custom_model_development"}
        if not _embedded():
            return client.create_experiment(name, tags=tags)
        eid = client.create_experiment(name, artifact_location=(root / ARTIFACTS_DIR / name).as_uri(), tags=tags)
        with contextlib.closing(sqlite3.connect(str(db_path(root)), timeout=30)) as conn, conn:
            conn.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                         (f"{ARTIFACTS_DIR}/{name}", int(eid)))
        return eid


@contextlib.contextmanager
def using_store(root: str | os.PathLike):
    """MLflow's fluent API (``mlflow.pyfunc.load_model("models:/...")``, ``mlflow.search_runs``)
    on the store of ``root``, from the root (relative artifact locations resolve from there);
    the process's tracking URI, ``$MLFLOW_TRACKING_URI`` and working directory are restored
    afterwards (MLflow's ``set_tracking_uri`` also sets the variable, which child processes
    would inherit)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri(root)
    with contextlib.chdir(root) if _embedded() else contextlib.nullcontext():
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(before)


def _quote(s: str) -> str:
    return "'" + str(s).replace("\\", "\\\\").replace("'", "\\'") + "'"


def find_runs(client, exp_id: str, filters: Mapping[str, str]) -> list:
    """Active runs of the experiment whose tags equal ``filters``, newest first."""
    flt = " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in filters.items())
    return client.search_runs([exp_id], filter_string=flt, order_by=["attributes.start_time DESC"],
                              max_results=1000)


def _retrying(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, retried after a short sleep (a store briefly locked by another run)."""
    for sleep in _RETRY_SLEEPS:
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001
            time.sleep(sleep)
    return fn(*args, **kwargs)


def metric_entities(metrics: Mapping[str, Any], step: int | None = None) -> list:
    """MLflow ``Metric`` entities of the finite numbers in ``metrics`` (None, strings, bools skipped)."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(metric_key(k), float(v), ts, int(step or 0)) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def metric_key(name: str) -> str:
    """``name`` as an MLflow metric / param key (``+complementary`` -> ``plus_complementary``)."""
    return re.sub(r"[^\w.\- /:]", "_", str(name).replace("+", "plus_"))


# ---------------------------------------------------------------- run tracker

class RunTracker:
    """One MLflow run of one stage execution::

        with RunTracker(store_root(), experiment_name("synthetic", 1)) as tr:
            tr.start(params_hash(p), "train", flatten(to_dict(p)), params_text, {"stage": "train"})
            ... tr.log_metrics({"loss": 0.5}, step=10) ...
        # FINISHED on normal exit, FAILED on an exception, KILLED on KeyboardInterrupt;
        # a reopened FINISHED run is left as it was
    """

    def __init__(self, root: str | os.PathLike, experiment: str, *, timeout: float = 30.0, strict: bool = False):
        self.root = Path(root).resolve()
        self.experiment = experiment
        self.timeout = float(timeout)
        self.strict = strict
        self.client = None
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.resumed = False        # an interrupted run continued
        self.reopened = False       # a FINISHED run given more results; its status and times stay
        self.status: str | None = None
        self.failures: list[str] = []

    def start(self, params_hash: str, run_name: str, params_flat: Mapping[str, Any], params_yaml_text: str,
              tags: Mapping[str, Any] | None = None, resume: bool = True, include_finished: bool = False) -> str:
        """Open, resume or reopen the run (module docstring) and return its id; call it before
        any expensive work (:class:`TrackingError` when the store cannot be used)."""
        if not params_hash:
            raise ValueError("params_hash must be a non-empty string")
        self.client = client = open_client(self.root, self.timeout)
        commit = git_commit(self.root)
        all_tags = {"git_commit": commit, "mlflow.source.git.commit": commit,
                    "dvc_exp_name": os.environ.get("DVC_EXP_NAME") or "workspace",
                    **({"dvc_exp_baseline_rev": os.environ["DVC_EXP_BASELINE_REV"]}
                       if os.environ.get("DVC_EXP_BASELINE_REV") else {}),
                    **{str(k): str(v) for k, v in (tags or {}).items()}, "params_hash": str(params_hash)}
        params = {str(k): "" if v is None else str(v) for k, v in params_flat.items()}
        try:
            from mlflow.entities import Param, RunTag

            self.experiment_id = _retrying(experiment_id, client, self.root, self.experiment)
            found = None
            if resume:
                runs = _retrying(find_runs, client, self.experiment_id, {"params_hash": params_hash})
                found = next((r for r in runs if include_finished or r.info.status in UNFINISHED), None)
            if found is None:
                run = _retrying(client.create_run, self.experiment_id, tags=all_tags, run_name=run_name)
                self.run_id, self.status = run.info.run_id, "RUNNING"
                _retrying(client.log_batch, self.run_id, params=[Param(k, v) for k, v in params.items()])
                self._at_root(client.log_text, self.run_id, params_yaml_text, "params.yaml")
                return self.run_id
            self.run_id = found.info.run_id
            old = found.data
            changed = sorted(k for k, v in params.items() if k in old.params and old.params[k] != v)
            if changed:
                log.warning("MLflow run %s keeps its logged values of %s", self.run_id, ", ".join(changed))
            new_tags = {k: v for k, v in all_tags.items() if k not in old.tags}
            if found.info.status == "FINISHED":
                self.reopened, self.status = True, "FINISHED"
            else:
                self.resumed, self.status = True, "RUNNING"
                _retrying(client.update_run, self.run_id, status="RUNNING")
                new_tags["resume_count"] = str(int(old.tags.get("resume_count", "0") or 0) + 1)
                if old.tags.get("git_commit", commit) != commit:
                    new_tags["git_commit_resumed"] = commit
            _retrying(client.log_batch, self.run_id, params=[Param(k, v) for k, v in params.items()
                                                             if k not in old.params],
                      tags=[RunTag(k, v) for k, v in new_tags.items()])
            if "params.yaml" not in {f.path for f in self._at_root(client.list_artifacts, self.run_id)}:
                self._at_root(client.log_text, self.run_id, params_yaml_text, "params.yaml")
        except Exception as e:  # noqa: BLE001
            raise TrackingError(f"MLflow store {_store_name(self.root)}: starting a run in experiment "
                                f"'{self.experiment}' failed: {type(e).__name__}: {e}") from e
        return self.run_id

    # -- logging (retried; on failure warned about, or raised when strict)
    def _at_root(self, fn, *args, retry: bool = True, **kwargs):
        """Call ``fn`` (retried) from the store root: MLflow resolves the relative artifact
        locations from the working directory (callers pass absolute local paths)."""
        with contextlib.chdir(self.root) if _embedded() else contextlib.nullcontext():
            return _retrying(fn, *args, **kwargs) if retry else fn(*args, **kwargs)

    def _call(self, what: str, fn, *args, retry: bool = True, **kwargs) -> bool:
        if self.run_id is None or self.client is None:
            raise RuntimeError("RunTracker.start() has not been called")
        try:
            self._at_root(fn, *args, retry=retry, **kwargs)
            return True
        except Exception as e:  # noqa: BLE001
            msg = f"MLflow store {_store_name(self.root)}: {what} failed for run {self.run_id}: {type(e).__name__}: {e}"
            if self.strict:
                raise TrackingError(msg) from e
            log.warning("%s (continuing; the DVC outputs remain the record)", msg)
            self.failures.append(msg)
            return False

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the finite numbers of ``metrics`` (None, strings and bools are skipped)."""
        self._call("log_metrics", self.client.log_batch, self.run_id, metrics=metric_entities(metrics, step))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file (or every file of a folder) into the run's artifacts."""
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {path}")
        fn = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        self._call(f"log_artifact({path})", fn, self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._call("set_tags", self.client.log_batch, self.run_id,
                   tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

    def log_model(self, model_file: str | os.PathLike, example, registered_name: str | None = None) -> None:
        """Log the trained model file as an MLflow pyfunc model of this run (image in, label map
        out: :mod:`pipeline.serving`), registered as ``registered_name`` when given."""
        model_file = Path(model_file).resolve()

        def log_pyfunc():
            from .serving import log_segmenter
            with using_store(self.root):
                log_segmenter(self.client, self.experiment_id, self.run_id, model_file, example, registered_name)

        self._call("log_model", log_pyfunc, retry=False)      # a retry would log a second model

    def runs_url(self) -> str:
        """The UI page of this run's experiment's runs table (``make ui`` serves the embedded store)."""
        base = tracking_uri(self.root) if not _embedded() else "http://127.0.0.1:5000"
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs"

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with an MLflow status (FINISHED, FAILED or KILLED); idempotent, and a no-op
        on a reopened FINISHED run."""
        status = status.upper()
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
        if self.run_id is None or self.status in ("FINISHED", "FAILED", "KILLED"):
            return
        if self._call(f"finish({status})", self.client.set_terminated, self.run_id, status):
            self.status = status

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        status = "FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        try:
            self.finish(status)
        except TrackingError:
            if exc_type is None:
                raise
            log.exception("could not mark MLflow run %s %s", self.run_id, status)
        return False
