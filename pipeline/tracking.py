"""MLflow tracking: one store per repository, one experiment per dataset and split, one run per
trained thing (found again by its ``params_hash`` tag: resumed when unfinished, reopened to add
results, never moved nor re-finished). Store, root and artifact layout: docs/ARCHITECTURE.md
("MLflow"). A store that cannot be opened fails before any work (:class:`TrackingError`); a later
failure is warned about (the DVC outputs are the record, MLflow the index) or raised (``strict``).
Each training's resumable checkpoints go into its run (:class:`CheckpointLogger`), and a training
resumes from a run's newest one (:func:`fetch_checkpoint`). MLflow is imported on use only.
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
UI_URL = "http://127.0.0.1:5000"        # where `make ui` serves the embedded store
# Registry aliases (docs/MLFLOW_UI.md): CHAMPION moves to a version whose CHAMPION_METRIC (evaluate
# stage) beats the current champion's. LATEST is MLflow's own: 3.17 reserves the alias name "latest"
# (set_registered_model_alias refuses it, in the SQL store and on a server) and resolves
# models:/<name>@latest to the newest version by itself, so every new version has it at once.
LATEST, CHAMPION, CHAMPION_METRIC = "latest", "champion", "mIoU_novel"


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
    """``name`` as an MLflow metric / param key: the one place a name is respelled for MLflow.

    MLflow metric and param names allow only alphanumerics and ``_ - . space / :``. Runs carry
    metrics with generic names (``mIoU_novel``) and say which variant they are in the tag
    ``variant`` (``+complementary``, spelled as in params.yaml, the cell folders, the report and
    ``reports/ablation.json``). Only the grid's parent run, which holds every variant's mean
    and std, needs a variant in a metric name: ``+`` becomes ``plus_`` there
    (``plus_complementary.mIoU_novel.mean``), and the parent's tag ``variant_keys`` lists each
    respelled variant (``plus_complementary=+complementary``)."""
    return re.sub(r"[^\w.\- /:]", "_", str(name).replace("+", "plus_"))


def metric_entities(metrics: Mapping[str, Any], step: int | None = None, model_id: str | None = None,
                    dataset: "DatasetRef | None" = None) -> list:
    """MLflow ``Metric`` entities of the finite numbers in ``metrics`` (None, strings, bools skipped);
    linked to the logged model ``model_id`` and the dataset ``dataset`` when given (MLflow 3: the
    model's page lists them, per dataset)."""
    from mlflow.entities import Metric
    from mlflow.utils.time import get_current_time_millis
    ts = get_current_time_millis()
    link = {"model_id": model_id} if model_id else {}
    if dataset is not None:
        link.update(dataset_name=dataset.name, dataset_digest=dataset.digest)
    return [Metric(metric_key(k), float(v), ts, int(step or 0), **link) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


class DatasetRef:
    """A dataset as MLflow records it (a run input; the dataset column of linked metrics):
    ``name`` (the ``data.dataset`` param), ``digest`` (DVC's md5 of the folder from ``dvc.lock``,
    e.g. ``74cc...7df.dir``; outside DVC an md5 of the file listing), ``source`` (the folder)
    and ``profile`` (what else is known: DVC stage, size, file count, where the digest is from)."""

    def __init__(self, name: str, digest: str, source: str, profile: Mapping[str, Any]):
        self.name, self.digest, self.source, self.profile = name, digest, source, dict(profile)

    @classmethod
    def of_folder(cls, name: str, folder, cwd=None) -> "DatasetRef":
        """``folder`` (as the stage was given it, e.g. ``data/dataset``) with its digest from
        ``dvc.lock`` (the download stage's output hash), else from its file listing."""
        import hashlib
        import json

        from .repo import dvc_out
        out = dvc_out(folder, cwd)
        if out is not None:
            return cls(name, out["md5"], str(folder), {"digest_from": "dvc.lock", "dvc_stage": out["stage"],
                                                       "size": out["size"], "nfiles": out["nfiles"]})
        root = Path(folder)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        listing = json.dumps([(p.relative_to(root).as_posix(), p.stat().st_size) for p in files])
        return cls(name, hashlib.md5(listing.encode()).hexdigest(), str(folder),
                   {"digest_from": "file names and sizes (no dvc.lock entry)", "nfiles": len(files),
                    "size": sum(p.stat().st_size for p in files)})

    def entity(self):
        import json

        from mlflow.entities import Dataset
        return Dataset(name=self.name, digest=self.digest, source_type="local",
                       source=json.dumps({"uri": self.source}), schema=None, profile=json.dumps(self.profile))


class RunTracker(contextlib.AbstractContextManager):
    """One MLflow run of one stage execution (:meth:`start`; use: :func:`open_tracker`), ended FINISHED,
    FAILED on an exception, KILLED on KeyboardInterrupt (a reopened FINISHED run is left as it was)."""

    def __init__(self, root, experiment: str, *, timeout: float = 30.0, strict: bool = False):
        self.root, self.experiment, self.timeout, self.strict = Path(root).resolve(), experiment, timeout, strict
        self.client = self.experiment_id = self.run_id = self.status = None
        self.created = False            # start() made a new run (rather than resuming or reopening one)
        self._monitor = None            # the system metrics sampler (start_system_metrics)

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
            try:                             # typed "Machine learning"; the 3.17 UI still opens it on GenAI
                                             # pages unless the address says workflowType (runs_url)
                eid = client.create_experiment(name, location, {"mlflow.experimentKind": "custom_model_development"})
            except Exception:  # noqa: BLE001
                if (exp := client.get_experiment_by_name(name)) is None:
                    raise
                return exp.experiment_id
            if location:
                # Why SQL: MLflow 3.17's API cannot record a relative location (SqlAlchemyStore.
                # create_experiment passes artifact_location through resolve_uri_if_local, which makes
                # "mlartifacts/<name>" absolute against the cwd), and an absolute one breaks every
                # copy or move of the repository. The experiment was created just above, under the
                # init lock; tests/test_mlflow_registry.py checks this on a freshly created store.
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
            self.created = found is None
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

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, model_id: str | None = None,
                    dataset: DatasetRef | None = None) -> None:
        """Log the finite numbers of ``metrics`` (None, strings and bools are skipped); linked to the
        logged model ``model_id`` and to ``dataset`` when given."""
        self._call("log_metrics", self.client.log_batch, self.run_id,
                   metrics=metric_entities(metrics, step, model_id, dataset))

    def log_dataset(self, dataset: DatasetRef, context: str = "training") -> None:
        """Record ``dataset`` as an input of the run (the run page's Datasets, with ``context``)."""
        from mlflow.entities import DatasetInput, InputTag
        self._call("log_inputs", self.client.log_inputs, self.run_id,
                   datasets=[DatasetInput(dataset.entity(), [InputTag("mlflow.data.context", context)])])

    def start_system_metrics(self, interval: float = 10.0) -> None:
        """Sample CPU, memory, disk and network (and GPU where MLflow can read it: nvidia-ml-py)
        every ``interval`` s (``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides) into the run's
        ``system/*`` metrics until :meth:`finish`. Needs psutil; without it a warning, no sampling."""
        if self._monitor is not None or self.run_id is None:
            return
        try:
            import psutil  # noqa: F401  (MLflow's CPU and memory monitor)
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            for name in ("mlflow.system_metrics", "mlflow.system_metrics.system_metrics_monitor"):
                logging.getLogger(name).setLevel(logging.WARNING)
            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval, resume_logging=True,
                                                 tracking_uri=tracking_uri(self.root))
            self._monitor.start()
        except Exception as e:  # noqa: BLE001 - the training goes on without system metrics
            self._monitor = None
            log.warning("MLflow run %s: no system metrics (%s: %s)", self.run_id, type(e).__name__, e)

    def _stop_system_metrics(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            try:
                monitor.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("MLflow run %s: stopping the system metrics failed: %s", self.run_id, e)

    def logged_model_id(self) -> str | None:
        """The id of the newest model logged by this run (MLflow 3 LoggedModel), None without one."""
        try:
            found = self.client.search_logged_models([self.experiment_id],
                                                     filter_string=f"source_run_id = '{self.run_id}'",
                                                     order_by=[{"field_name": "creation_timestamp", "ascending": False}],
                                                     max_results=1)
            return found[0].model_id if found else None
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow run %s: looking up its logged model failed: %s", self.run_id, e)
            return None

    def log_figure(self, fig, artifact_file: str) -> None:
        """A matplotlib figure as a PNG artifact of the run (previewed on the run's Artifacts tab)."""
        self._call(f"log_figure({artifact_file})", self.client.log_figure, self.run_id, fig, artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag
        self._call("set_tags", self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        """Copy a file into the run's artifacts."""
        self._call(f"log_artifact({path})", self.client.log_artifact, self.run_id, str(Path(path).resolve()),
                   artifact_path)

    def log_model(self, model_file, example, registered_name: str | None = None):
        """The model file as an MLflow pyfunc model of this run (:mod:`pipeline.serving`), registered
        as ``registered_name`` when given (the newest version: ``models:/<name>@latest``, MLflow's
        reserved alias). Returns MLflow's ``ModelInfo`` (None when logging failed and was warned about)."""
        from .serving import log_segmenter
        got = []
        ok = self._call("log_model", lambda *a: got.append(log_segmenter(*a)), self.client, self.experiment_id,
                        self.run_id, Path(model_file).resolve(), example, registered_name, fluent=True)
        return got[0] if ok and got else None

    def promote(self, registered_name: str, value: float | None, metric: str = CHAMPION_METRIC) -> dict:
        """After evaluation: the registered versions of this run get ``metric`` as a version tag, and
        the alias :data:`CHAMPION` moves to this run's newest version when ``value`` beats the
        current champion's (or there is none). Returns ``{"version", "champion", "previous"}``."""
        out = {"version": None, "champion": False, "previous": None}
        if self.strict:
            out.update(promote_version(self.client, registered_name, self.run_id, value, metric))
            return out
        try:
            out.update(promote_version(self.client, registered_name, self.run_id, value, metric))
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow store %s: setting the %s alias of %s failed for run %s: %s (continuing; the DVC "
                        "outputs remain the record)", _store_name(self.root), CHAMPION, registered_name, self.run_id, e)
        return out

    def runs_url(self) -> str:
        """The UI page of this run's experiment's runs table (``make ui`` serves the embedded store)."""
        return runs_url(self.experiment_id)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as FINISHED, FAILED or KILLED; idempotent, and a no-op on a reopened run."""
        self._stop_system_metrics()
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


# ----------------------------------------------------------------------------- the UI and the registry

def ui_base() -> str:
    """The MLflow UI's address: the tracking server when ``$MLFLOW_TRACKING_URI`` is one, else
    where ``make ui`` serves the embedded store."""
    server = _server()
    return (server if server.startswith(("http://", "https://")) else UI_URL).rstrip("/")


def runs_url(experiment_id) -> str:
    """The experiment's runs table. MLflow 3 opens on a GenAI home page and an experiment on its
    traces; ``workflowType=machine_learning`` selects the model-training view with the runs table."""
    return f"{ui_base()}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def models_url(experiment_id) -> str:
    """The experiment's Models tab: every logged model with the metrics linked to it."""
    return f"{ui_base()}/#/experiments/{experiment_id}/models?workflowType=machine_learning"


def registry_url(name: str) -> str:
    """The registered model's page (versions and their aliases ``latest`` / ``champion``)."""
    from urllib.parse import quote
    return f"{ui_base()}/#/models/{quote(name)}"


def model_version_url(name: str, version) -> str:
    """One registered version's page: its aliases, source run and logged model."""
    return f"{registry_url(name)}/versions/{version}"


def ui_links(root, experiment: str) -> dict | None:
    """``{"experiment_id", "runs", "models", "registry", "champion", "latest"}`` of ``experiment``
    in the store of ``root`` (champion / latest: the versions holding those aliases, or None);
    None when the store has no such experiment."""
    from mlflow.exceptions import MlflowException
    client = open_client(root)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    out = {"experiment_id": exp.experiment_id, "runs": runs_url(exp.experiment_id),
           "models": models_url(exp.experiment_id), "registry": registry_url(experiment)}
    try:
        out[CHAMPION] = client.get_model_version_by_alias(experiment, CHAMPION).version
    except MlflowException:
        out[CHAMPION] = None
    versions = [int(v.version) for v in client.search_model_versions(f"name = '{experiment}'")]
    out[LATEST] = str(max(versions)) if versions else None
    return out


def promote_version(client, name: str, run_id: str, value: float | None, metric: str = CHAMPION_METRIC) -> dict:
    """See :meth:`RunTracker.promote`. The champion's value is its version tag ``metric`` (set
    here), else its run's metric. A missing or non-finite ``value`` never becomes champion."""
    from mlflow.exceptions import MlflowException
    mine = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")]
    if not mine:
        return {"version": None, "champion": False, "previous": None}
    newest = max(mine, key=lambda v: int(v.version))
    finite = value is not None and math.isfinite(float(value))
    if finite:
        for v in mine:
            client.set_model_version_tag(name, v.version, metric, f"{float(value):.6g}")
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champ = None
    previous = champ.version if champ is not None else None
    if champ is not None and champ.run_id == run_id:
        return {"version": newest.version, "champion": True, "previous": previous}
    best = None
    if champ is not None:
        raw = champ.tags.get(metric)
        if raw is None:
            raw = client.get_run(champ.run_id).data.metrics.get(metric_key(metric))
        best = None if raw is None else float(raw)
    wins = finite and (best is None or not math.isfinite(best) or float(value) > best)
    if wins:
        client.set_registered_model_alias(name, CHAMPION, newest.version)
    return {"version": newest.version, "champion": wins, "previous": previous}


# ----------------------------------------------------------------------------- what the stages log

def open_tracker(p, params_text: str, tags: Mapping[str, Any], name: str, phash: str | None = None,
                 include_finished: bool = False, root=None, experiment: str | None = None) -> RunTracker:
    """Start, resume or reopen (by params hash) the MLflow run of the params ``p`` in the store of
    ``root`` (default: the repository's, :func:`pipeline.repo.store_root`), in ``experiment`` (default:
    :func:`experiment_name` of the params); fails before any work when the store cannot be opened.
    ``params_text`` is logged as the run's params.yaml."""
    from .config import flatten, params_hash, to_dict
    tracker = RunTracker(root or store_root(), experiment or experiment_name(p.data.dataset, p.data.split))
    tracker.start(phash or params_hash(p), run_name(name), flatten(to_dict(p)), params_text, tags=tags,
                  include_finished=include_finished)
    return tracker


def novel_mask_tags(p) -> dict[str, str]:
    """``{"diagnostic": "uses novel masks (<what>)"}`` for a run whose training reads novel masks
    (:func:`pipeline.config.novel_mask_use`: the oracle teacher, the fully supervised oracle), else {}."""
    from .config import novel_mask_use
    use = novel_mask_use(p)
    return {"diagnostic": f"uses novel masks ({use})"} if use else {}


def training_callbacks(tracker: RunTracker | None, cores, p) -> dict:
    """The callbacks of the training loop, as keyword arguments of
    :func:`pipeline.engine.train.train` (``train(..., **training_callbacks(tracker, cores, p))``):
    ``on_log`` forwards a step's record to MLflow and re-shares the CPU cores among the trainings
    running (:class:`pipeline.jobs.CoreShare`); ``on_checkpoint`` copies each resumable checkpoint
    into the run, keeping the newest ``p.train.mlflow_checkpoints`` (:class:`CheckpointLogger`;
    none without a tracker or with 0). ``p``: the params the loop trains with."""
    def on_log(step, rec):
        cores.rebalance()
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=step)
    keep = p.train.mlflow_checkpoints
    if tracker is None or not keep:
        return {"on_log": on_log, "on_checkpoint": None}
    from .config import params_hash
    return {"on_log": on_log, "on_checkpoint": CheckpointLogger(tracker, keep, params_hash(p))}


def log_trained_model(tracker: RunTracker | None, model_path, example_image, cores, register: bool):
    """The trained model as an MLflow model of the run (``example_image``: its input example),
    registered under the experiment's name when ``register`` (``@latest`` resolves to it); and the torch
    threads the training used (tag ``torch_threads``). Returns MLflow's ``ModelInfo`` or None."""
    if tracker is None:
        return None
    tracker.set_tags({"torch_threads": ",".join(map(str, cores.used)) or "default"})
    return tracker.log_model(model_path, example_image, tracker.experiment if register else None)


def log_evaluation(tracker: RunTracker, metrics: Mapping[str, Any], dataset: DatasetRef | None,
                   model_id: str | None = None) -> None:
    """The evaluation's summary metrics on the run, linked to the run's logged model (``model_id``,
    else the newest one the run logged) and to the dataset they were measured on: the Models tab
    and the model's page show them."""
    tracker.log_metrics(metrics, model_id=model_id or tracker.logged_model_id(), dataset=dataset)


def sync_grid(root, experiment: str, grid_id: str, grid_params: Mapping[str, Any],
              cells: list[dict], grid_metrics: Mapping[str, float], params_yaml_text: str,
              artifacts: Iterable = ()) -> dict:
    """The grid's parent run (found again by ``grid_id``) and one child per cell.

    One grid, one DVC experiment: the parent and every child carry the tags ``grid_id`` and
    ``dvc_exp_name``, so ``tags.grid_id = '<id>'`` in the runs table, grouped by ``variant``,
    shows exactly this grid's cells (one run per cell: its own or a link), never the cells of
    another ``dvc exp run`` made in the same workspace. ``grid_metrics`` are the means of
    exactly ``cells``.

    ``cells``: dicts with ``variant``, ``seed``, ``params_hash``, ``params_flat``,
    ``params_text`` (the cell's effective params) and ``metrics``; optionally ``split`` (tag) and
    ``name`` (the run name; default ``<variant>-seed<seed>``). A cell's own run (found by
    params hash: the ablate stage's, or the main training's for the shared cell) becomes the
    child when it has no parent; one that already belongs to another grid gets a link child
    here (tag ``linked_run_id``; the run itself is never moved); a cell restored by a DVC
    run-cache hit has no run in this store, so one is made from its saved metrics. Running
    again creates nothing. ``grid_metrics`` (per-variant mean and std) and ``artifacts``
    (tables, report) go on the parent. Returns ``{"parent": id, "children": {"<variant>-<seed>": id}}``.
    """
    from mlflow.entities import Param

    parent = RunTracker(root, experiment, strict=True)
    exp_name = os.environ.get("DVC_EXP_NAME") or "workspace"
    respelled = {metric_key(v): v for v in dict.fromkeys(c["variant"] for c in cells) if metric_key(v) != v}
    with parent:
        parent.start(f"grid-{grid_id}", run_name("ablation-grid"), grid_params, params_yaml_text,
                     tags={"role": "ablation_grid", "grid_id": grid_id,
                           "mlflow.note.content": f"Ablation grid {grid_id}: {len(cells)} cells. Its cells: "
                                                  f"filter the runs with tags.grid_id = '{grid_id}'.",
                           **({"variant_keys": ", ".join(f"{k}={v}" for k, v in respelled.items())}
                              if respelled else {})},
                     include_finished=True)
        client, exp_id = parent.client, parent.experiment_id
        children = {}
        for cell in cells:
            name = cell.get("name") or f"{cell['variant']}-seed{cell['seed']}"
            tags = {"variant": cell["variant"], "seed": str(cell["seed"]), "grid_id": grid_id,
                    "mlflow.parentRunId": parent.run_id,
                    **({"split": str(cell["split"])} if cell.get("split") is not None else {})}
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
                                               "dvc_exp_name": exp_name,
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


# ----------------------------------------------------------------------------- resumable checkpoints in the run

CHECKPOINTS_DIR, LATEST_FILE = "checkpoints", "latest.json"    # artifacts checkpoints/step-000100.pt, latest.json
_STEP_FILE = re.compile(r"step-(\d+)\.pt")
_RUN_URI = re.compile(r"runs:/([0-9A-Za-z_-]+)/?")


def checkpoint_name(step: int) -> str:
    """The artifact file name of the checkpoint written after ``step`` steps (``step-000100.pt``)."""
    return f"step-{int(step):06d}.pt"


@contextlib.contextmanager
def _scratch(beside: Path, clean: bool = False):
    """A temporary folder beside the file ``beside`` (same filesystem: a hard link, an atomic rename),
    removed afterwards; ``clean``: first remove the ones a killed process left there."""
    import shutil
    import tempfile
    folder, prefix = beside.parent, f".{beside.name}."
    folder.mkdir(parents=True, exist_ok=True)
    if clean:
        for old in folder.glob(f"{prefix}*.mlflow"):
            shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=prefix, suffix=".mlflow", dir=folder) as tmp:
        yield Path(tmp)


class CheckpointLogger:
    """``on_checkpoint(path, step)`` of the training loop (:func:`training_callbacks`): the checkpoint
    just written becomes the run's artifact ``checkpoints/step-<step>.pt``; then
    ``checkpoints/latest.json`` names it (``{"step", "file", "params_hash"}``); then every other
    checkpoint of the run is deleted but the newest ``keep`` at or before ``step`` (one after ``step``
    is left by an earlier attempt of this run that got further: a resume starts from latest.json,
    never from it). In that order, so that latest.json names a complete file even after a kill.

    Deleting goes through the run's artifact repository (``delete_artifacts``): the embedded store's
    folder, a tracking server's proxied artifacts (``mlflow server``), S3, GCS, Azure Blob, HDFS and
    SFTP delete; stores whose MLflow repository cannot (DBFS, FTP, Azure Data Lake) keep every
    checkpoint, with one warning per run, and latest.json still names the newest. Any failure is a
    warning: the training goes on, its local checkpoint is the record."""

    def __init__(self, tracker: RunTracker, keep: int, phash: str):
        self.tracker, self.keep, self.phash = tracker, int(keep), phash
        self._repo = None           # the run's artifact repository (deletions)
        self._can_delete = True     # False once the store said it cannot delete
        self._first = True

    def __call__(self, path, step: int) -> None:
        import shutil
        tr, name, path = self.tracker, checkpoint_name(step), Path(path).resolve()
        with _scratch(path, clean=self._first) as tmp:
            self._first = False
            staged = tmp / name
            try:
                os.link(path, staged)           # no copy: the next checkpoint replaces the file, not this inode
            except OSError:
                shutil.copyfile(path, staged)
            if not tr._call(f"logging checkpoint {name}", tr.client.log_artifact, tr.run_id, str(staged),
                            CHECKPOINTS_DIR):
                return
        latest = {"step": int(step), "file": name, "params_hash": self.phash}
        if tr._call(f"writing {CHECKPOINTS_DIR}/{LATEST_FILE}", tr.client.log_dict, tr.run_id, latest,
                    f"{CHECKPOINTS_DIR}/{LATEST_FILE}"):
            self._prune(int(step))

    def _prune(self, step: int) -> None:
        tr, listed = self.tracker, []
        if not self._can_delete or not tr._call("listing the run's checkpoints", lambda: listed.extend(
                tr.client.list_artifacts(tr.run_id, CHECKPOINTS_DIR))):
            return
        steps = {int(m[1]): f.path for f in listed if (m := _STEP_FILE.fullmatch(f.path.rsplit("/", 1)[-1]))}
        kept = set(sorted(s for s in steps if s <= step)[-self.keep:])
        for s in sorted(set(steps) - kept):
            if not self._delete(steps[s]):
                return

    def _delete(self, artifact_path: str) -> bool:
        tr = self.tracker
        try:
            with _from_root(tr.root):
                if self._repo is None:
                    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
                    self._repo = get_artifact_repository(tr.client.get_run(tr.run_id).info.artifact_uri,
                                                         tracking_uri=tracking_uri(tr.root))
                self._repo.delete_artifacts(artifact_path)
            return True
        except Exception as e:  # noqa: BLE001
            # MLflow's repositories that cannot delete raise NotImplementedError or "Not implemented yet"
            self._can_delete = not (isinstance(e, NotImplementedError) or "not implemented" in str(e).lower())
            msg = (f"MLflow store {_store_name(tr.root)}: run {tr.run_id}: " +
                   (f"deleting {artifact_path} failed: {type(e).__name__}: {e}" if self._can_delete else
                    f"its artifact store cannot delete artifacts ({type(e).__name__}: {e}): every checkpoint stays "
                    f"in the run ({CHECKPOINTS_DIR}/{LATEST_FILE} names the newest)"))
            if tr.strict:
                raise TrackingError(msg) from e
            log.warning("%s (continuing)", msg)
            return False


def run_id_of(uri: str) -> str:
    """The run id of ``runs:/<run_id>``, what ``--resume-from`` takes."""
    m = _RUN_URI.fullmatch(str(uri).strip())
    if m is None:
        raise ValueError(f"--resume-from takes runs:/<run_id> (an MLflow run whose training logged checkpoints), "
                         f"not '{uri}'")
    return m[1]


def _params_differ(logged: Mapping[str, str], p) -> list[str]:
    """``key <run's value> (run) vs <value> (here)`` for each hashed params key (:func:`pipeline.config.
    hashed_params`) whose value the run logged differently."""
    from .config import flatten, hashed_params
    here = {k: "" if v is None else str(v) for k, v in flatten(hashed_params(p)).items()}
    return [f"{k} {logged[k]} (run) vs {v} (here)" for k, v in here.items() if k in logged and logged[k] != v]


def fetch_checkpoint(root, uri: str, p, dest) -> dict:
    """Download the newest checkpoint that the run ``uri`` (``runs:/<run_id>``) logged
    (:class:`CheckpointLogger`) from the store of ``root`` to ``dest``, the training's own checkpoint
    file: the training then resumes from it exactly as from a checkpoint it wrote itself (the same
    file, byte for byte). Downloaded into a temporary folder beside ``dest``, checked (it loads, it
    holds these params at the step latest.json names) and renamed onto ``dest``.

    Refused with a :class:`TrackingError`, before anything is written: no such run, a deleted run, a
    run without checkpoints, a checkpoint of other params (both params hashes and the keys whose
    logged value differs), and a checkpoint of these params at ``dest`` that is further on than the
    run's (it is kept: resume from it without ``--resume-from``, or remove it). Returns
    ``{"run_id", "status", "step", "file"}``; ``status``: the run's MLflow status."""
    import json
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    from .config import params_hash
    from .engine.checkpoint import checkpoint_step, load_checkpoint
    run_id, root, dest = run_id_of(uri), Path(root).resolve(), Path(dest).resolve()
    fail = f"--resume-from {uri}: "
    client = open_client(root)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(f"{fail}MLflow store {_store_name(root)}: {type(e).__name__}: {e}") from e
        raise TrackingError(f"{fail}the MLflow store {_store_name(root)} has no run {run_id}") from None
    if run.info.lifecycle_stage == "deleted":
        raise TrackingError(f"{fail}run {run_id} is deleted in the MLflow store {_store_name(root)} (restore it "
                            f"first: MlflowClient().restore_run)")
    with _from_root(root):
        names = {f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(run_id, CHECKPOINTS_DIR)}
    if LATEST_FILE not in names:
        raise TrackingError(f"{fail}run {run_id} has no checkpoint (no artifact {CHECKPOINTS_DIR}/{LATEST_FILE}: a "
                            f"training logs its checkpoints when train.mlflow_checkpoints > 0)")
    phash, uri_of = params_hash(p), tracking_uri(root)
    with tempfile.TemporaryDirectory() as tmp, _from_root(root):
        got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{CHECKPOINTS_DIR}/{LATEST_FILE}",
                                                       dst_path=tmp, tracking_uri=uri_of))
        try:
            latest = json.loads(got.read_text())
            step, name, theirs = int(latest["step"]), str(latest["file"]), str(latest["params_hash"])
        except (ValueError, KeyError, TypeError) as e:
            raise TrackingError(f"{fail}{CHECKPOINTS_DIR}/{LATEST_FILE} of run {run_id} is not a checkpoint record "
                                f"({{'step', 'file', 'params_hash'}}): {type(e).__name__}: {e}") from None
    if theirs != phash:
        differ = _params_differ(run.data.params, p)
        raise TrackingError(
            f"{fail}run {run_id}'s checkpoint belongs to other params (params hash {theirs}; these params: {phash}): "
            + ("; ".join(differ[:12]) + ("; ..." if len(differ) > 12 else "") if differ else
               "its logged params equal these on every hashed key (logged by another version of the code?)")
            + " - train with the run's params (its artifact params.yaml)")
    if name not in names:
        raise TrackingError(f"{fail}{CHECKPOINTS_DIR}/{LATEST_FILE} of run {run_id} names {name}, which the run "
                            f"does not hold (found: {', '.join(sorted(names - {LATEST_FILE})) or 'none'})")
    if (local := checkpoint_step(dest, phash)) > step:
        raise TrackingError(f"{fail}the checkpoint '{dest}' of these params is at step {local}, further on than "
                            f"run {run_id}'s latest ({name}, step {step}); it is kept: resume from it without "
                            "--resume-from, or remove it first")
    with _scratch(dest) as tmp, _from_root(root):
        got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{CHECKPOINTS_DIR}/{name}",
                                                       dst_path=str(tmp), tracking_uri=uri_of))
        try:
            ck = load_checkpoint(got)
        except ValueError as e:
            raise TrackingError(f"{fail}{CHECKPOINTS_DIR}/{name} of run {run_id}: {e}") from None
        if ck.get("params_hash") != phash or int(ck.get("step", -1)) != step:
            raise TrackingError(f"{fail}{CHECKPOINTS_DIR}/{name} of run {run_id} holds step {ck.get('step')} of "
                                f"params hash {ck.get('params_hash')}, not step {step} of {phash} as "
                                f"{LATEST_FILE} says")
        del ck
        os.replace(got, dest)
    return {"run_id": run_id, "status": run.info.status, "step": step, "file": name}


def mark_resumed(tracker: RunTracker | None, source_run_id: str) -> None:
    """The run of a training resumed from run ``source_run_id``'s checkpoint (``--resume-from``).

    The run is chosen as for a local resume (:func:`open_tracker`: the newest unfinished run of
    these params, else a new one). So resuming a killed or failed run goes on in that same run,
    like ``dvc repro`` after a kill (``resume_count`` + 1, the curve continued in place), and a
    finished run is never touched: the training gets a new run. A run other than the source is
    tagged ``resumed_from_run_id``; the source itself is not written to."""
    if tracker is not None and tracker.run_id != source_run_id:
        tracker.set_tags({"resumed_from_run_id": source_run_id})


def log_resumed_curve(tracker: RunTracker | None, history: list[dict], resumed_from: int) -> None:
    """A new run (:attr:`RunTracker.created`) of a resumed training gets the checkpoint's curve,
    the steps up to ``resumed_from``: the run then holds the whole curve (``resumed_from_step``
    tag: where its own steps start)."""
    if tracker is None or not tracker.created or not resumed_from:
        return
    tracker.set_tags({"resumed_from_step": resumed_from})
    metrics = [m for rec in history if rec.get("step", 0) <= resumed_from
               for m in metric_entities({k: v for k, v in rec.items() if k != "step"}, rec["step"])]
    for i in range(0, len(metrics), 1000):          # MLflow's limit per batch
        tracker._call("log_metrics", tracker.client.log_batch, tracker.run_id, metrics=metrics[i:i + 1000])
