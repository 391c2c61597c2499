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
            try:                             # the UI opens on the runs table
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


def training_callbacks(tracker: RunTracker | None, cores):
    """``on_log`` of the training loop: forward a step's record to MLflow and re-share the CPU
    cores among the trainings running (:class:`pipeline.jobs.CoreShare`)."""
    def on_log(step, rec):
        cores.rebalance()
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=step)
    return on_log


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
