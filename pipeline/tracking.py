"""MLflow tracking: one store per repository, one experiment per dataset and split.

Store: ``$MLFLOW_TRACKING_URI`` (a shared ``mlflow server``), else SQLite ``<root>/mlflow.db`` with
artifacts in ``<root>/mlartifacts/<experiment>/``, recorded relative to the root so that a copied
repository keeps them (hence MLflow works from the root: :func:`using_store`). The root is
``$DVC_ROOT`` (set by DVC also for ``dvc exp run --temp`` and queued runs in ``.dvc/tmp/exps/``),
else the git top level. One run per trained thing, found again by its ``params_hash`` tag: resumed
when unfinished, or reopened to add results, never moved nor re-finished. Ablation grids link their
cells' runs to a parent run: :func:`pipeline.ablation.sync_grid`. A store that cannot be opened
fails before any work (:class:`TrackingError`); later failures are retried, then warned about and
recorded in ``RunTracker.failures`` (the DVC outputs are the record, MLflow the index) or raised
(``strict``). MLflow is imported on use only.
"""
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
DB_NAME, ARTIFACTS_DIR = "mlflow.db", "mlartifacts"
INIT_LOCK_NAME = "mlflow.db-init.lock"  # matched by .gitignore's /mlflow.db-*
UNFINISHED, ENDED = ("RUNNING", "SCHEDULED", "FAILED", "KILLED"), ("FINISHED", "FAILED", "KILLED")
_RETRY_SLEEPS = (0.2, 0.5, 1.0)


class TrackingError(RuntimeError):
    """The MLflow store cannot be opened or written."""


def _git(root, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def git_commit(root) -> str:
    """``git rev-parse HEAD`` at ``root``; ``"unknown"`` outside a repository or without git."""
    return _git(root, "rev-parse", "HEAD") or "unknown"


def store_root(cwd=None) -> Path:
    """``$DVC_ROOT`` if set, else the git top level of ``cwd``, else ``cwd`` (absolute)."""
    if os.environ.get("DVC_ROOT", "").strip():
        return Path(os.environ["DVC_ROOT"].strip()).expanduser().resolve()
    cwd = Path.cwd() if cwd is None else Path(cwd)
    return Path(_git(cwd, "rev-parse", "--show-toplevel") or cwd).resolve()


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
    """Serialise creating the embedded store and its experiments between processes."""
    if _server():
        yield
        return
    import fcntl
    with open(root / INIT_LOCK_NAME, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
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
    if not _server() and not root.is_dir():
        raise TrackingError(f"MLflow store {db} is unreachable: the store folder {root} does not exist "
                            "(set DVC_ROOT or run from inside the repository)")
    if not _server() and db.exists() and not db.is_file():
        raise TrackingError(f"{fail}the path exists but is not a regular file")
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
    except Exception as e:  # noqa: BLE001 - any store failure is reported the same way
        held = (f" (another process held the database for more than {timeout:g} s)"
                if isinstance(e, sqlite3.OperationalError) and "locked" in str(e) else "")
        raise TrackingError(f"{fail}{type(e).__name__}: {e}{held}") from e


@contextlib.contextmanager
def using_store(root):
    """MLflow's fluent API (``mlflow.pyfunc.load_model("models:/...")``, ``mlflow.search_runs``) on
    the store of ``root``, from the root; restores the tracking URI, ``$MLFLOW_TRACKING_URI`` (which
    ``set_tracking_uri`` sets, for child processes to inherit) and the working directory."""
    import mlflow

    before, uri = os.environ.get("MLFLOW_TRACKING_URI"), tracking_uri(root)
    with _from_root(root):
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(before)


def find_runs(client, exp_id: str, filters: Mapping[str, str]) -> list:
    """Active runs of the experiment whose tags equal ``filters``, newest first."""
    quoted = {k: "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'" for k, v in filters.items()}
    return client.search_runs([exp_id], " and ".join(f"tags.`{k}` = {v}" for k, v in quoted.items()),
                              order_by=["attributes.start_time DESC"], max_results=1000)


def _retrying(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, retried after a short sleep (a store briefly locked by another run)."""
    for sleep in _RETRY_SLEEPS:
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001
            time.sleep(sleep)
    return fn(*args, **kwargs)


def metric_key(name: str) -> str:
    """``name`` as an MLflow metric / param key (``+complementary`` -> ``plus_complementary``)."""
    return re.sub(r"[^\w.\- /:]", "_", str(name).replace("+", "plus_"))


def metric_entities(metrics: Mapping[str, Any], step: int | None = None) -> list:
    """MLflow ``Metric`` entities of the finite numbers in ``metrics`` (None, strings, bools skipped)."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(metric_key(k), float(v), ts, int(step or 0)) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


class RunTracker:
    """One MLflow run of one stage execution, ended FINISHED, FAILED on an exception, KILLED on
    KeyboardInterrupt (a reopened FINISHED run is left as it was)::

        with RunTracker(store_root(), experiment_name("synthetic", 1)) as tr:
            tr.start(params_hash(p), "train", flatten(to_dict(p)), params_text, {"stage": "train"})
            tr.log_metrics({"loss": 0.5}, step=10)
    """

    def __init__(self, root, experiment: str, *, timeout: float = 30.0, strict: bool = False):
        self.root, self.experiment, self.timeout, self.strict = Path(root).resolve(), experiment, timeout, strict
        self.client = self.experiment_id = self.run_id = self.status = None
        self.resumed = self.reopened = False    # an interrupted run continued / a FINISHED run given more results
        self.failures: list[str] = []

    def _experiment(self) -> str:
        """The experiment's id, created (or restored) when needed; in the embedded store with its artifact
        folder ``mlartifacts/<name>`` relative to the root (MLflow would record an absolute path)."""
        client, name = self.client, self.experiment
        with _init_lock(self.root):
            exp = client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    client.restore_experiment(exp.experiment_id)
                return exp.experiment_id
            tags = {"mlflow.experimentKind": "custom_model_development"}    # the UI opens on the runs table
            if _server():
                return client.create_experiment(name, tags=tags)
            eid = client.create_experiment(name, (self.root / ARTIFACTS_DIR / name).as_uri(), tags)
            with contextlib.closing(sqlite3.connect(str(self.root / DB_NAME), timeout=30)) as conn, conn:
                conn.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                             (f"{ARTIFACTS_DIR}/{name}", int(eid)))
            return eid

    def start(self, params_hash: str, run_name: str, params_flat: Mapping[str, Any], params_yaml_text: str,
              tags: Mapping[str, Any] | None = None, resume: bool = True, include_finished: bool = False) -> str:
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

            self.experiment_id = _retrying(self._experiment)
            runs = _retrying(find_runs, client, self.experiment_id, {"params_hash": params_hash}) if resume else []
            found = next((r for r in runs if include_finished or r.info.status in UNFINISHED), None)
            if found is None:
                run = _retrying(client.create_run, self.experiment_id, tags=all_tags, run_name=run_name)
                self.run_id, self.status, old, new_tags = run.info.run_id, "RUNNING", {}, {}
            else:
                self.run_id, old, old_tags = found.info.run_id, found.data.params, found.data.tags
                changed = sorted(k for k, v in params.items() if old.get(k, v) != v)
                if changed:
                    log.warning("MLflow run %s keeps its logged values of %s", self.run_id, ", ".join(changed))
                new_tags = {k: v for k, v in all_tags.items() if k not in old_tags}
                self.reopened = found.info.status == "FINISHED"
                self.resumed, self.status = not self.reopened, "FINISHED" if self.reopened else "RUNNING"
                if self.resumed:
                    _retrying(client.update_run, self.run_id, status="RUNNING")
                    new_tags["resume_count"] = str(int(old_tags.get("resume_count") or 0) + 1)
                    if old_tags.get("git_commit", commit) != commit:
                        new_tags["git_commit_resumed"] = commit
            _retrying(client.log_batch, self.run_id, params=[Param(k, v) for k, v in params.items() if k not in old],
                      tags=[RunTag(k, v) for k, v in new_tags.items()])
            with _from_root(self.root):
                if found is None or "params.yaml" not in [f.path for f in _retrying(client.list_artifacts, self.run_id)]:
                    _retrying(client.log_text, self.run_id, params_yaml_text, "params.yaml")
        except Exception as e:  # noqa: BLE001
            raise TrackingError(f"MLflow store {_store_name(self.root)}: starting a run in experiment "
                                f"'{self.experiment}' failed: {type(e).__name__}: {e}") from e
        return self.run_id

    def _call(self, what: str, fn, *args, retry: bool = True, **kwargs) -> bool:
        """``fn`` from the root, retried; on failure warned about and recorded, or raised when strict."""
        try:
            with _from_root(self.root):           # callers pass absolute local paths
                _retrying(fn, *args, **kwargs) if retry else fn(*args, **kwargs)
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

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag
        self._call("set_tags", self.client.log_batch, self.run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        """Copy a file (or every file of a folder) into the run's artifacts."""
        path = Path(path).resolve()
        fn = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        self._call(f"log_artifact({path})", fn, self.run_id, str(path), artifact_path)

    def log_model(self, model_file, example, registered_name: str | None = None) -> None:
        """The model file as an MLflow pyfunc model of this run (:mod:`pipeline.serving`), registered
        as ``registered_name`` when given; not retried (a retry would log a second model)."""
        model_file = Path(model_file).resolve()

        def log_pyfunc():
            from .serving import log_segmenter
            with using_store(self.root):
                log_segmenter(self.client, self.experiment_id, self.run_id, model_file, example, registered_name)
        self._call("log_model", log_pyfunc, retry=False)

    def runs_url(self) -> str:
        """The UI page of this run's experiment's runs table (``make ui`` serves the embedded store)."""
        return f"{(_server() or 'http://127.0.0.1:5000').rstrip('/')}/#/experiments/{self.experiment_id}/runs"

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED; idempotent, and a no-op on a reopened run."""
        if self.run_id is not None and self.status not in ENDED and self._call(
                f"finish({status})", self.client.set_terminated, self.run_id, status):
            self.status = status

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        try:
            self.finish(status)
        except TrackingError:
            if exc_type is None:
                raise
            log.exception("could not mark MLflow run %s %s", self.run_id, status)
