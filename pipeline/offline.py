"""Running the pipeline where neither DVC nor MLflow is installed (a GPU machine lent for a session, a
cluster node), and bringing its results home as one self-describing bundle.

:func:`run_offline` (``python -m tools.offline_run``) runs stages of ``dvc.yaml`` in its order, each by
its own ``cmd`` (dvc.yaml stays the only place paths live), from the folder of dvc.yaml, with
``--params`` naming the effective params (the params file with the ``-S`` overrides applied and
validated, written into the bundle; the params file itself is never written), ``--no-progress`` and,
where the stage takes it (its ``--help`` lists it), ``--no-mlflow``. No stage imports MLflow or DVC
then (tests/test_offline_run.py runs the pipeline with both imports blocked). It is not DVC: every
stage chosen runs, whether its outputs are up to date or not (the train stage and the grid's cells
resume from their checkpoints, as under DVC), and dvc.lock is not written.

The bundle (``out``)::

    manifest.json       what ran where: the params text, the -S overrides and what they changed, the
                        commit (and whether the tree was dirty), host, device, torch / torchvision /
                        Python versions, start and end (UTC), wall seconds per stage, the command
                        line, and every bundled file with its size and sha256
    params.yaml         the effective params the stages read
    dvc.yaml            the pipeline that ran (which command wrote which file)
    logs/<stage>.log    each stage's output
    outputs/<path>      the outputs, at their dvc.yaml paths: metrics and plots, the outputs DVC keeps
                        in git (cache: false: reports/), and the grid's cell folders (cell.json,
                        metrics.json, per_class_iou.csv, curve.csv); model files (*.pt) only with
                        ``keep_models``; never the dataset nor the resumable checkpoints (persist)

and ``<out>.tar.gz`` (or ``tar``) of it, checked against a size limit (the GPU machine returns files
of up to 16 MiB).

:func:`import_bundle` (``python -m tools.import_runs``) logs a bundle into this repository's MLflow
store as new runs: the main model (its training curve, metrics and per-class IoU; the grid cell that
shares its training is logged into the same run, as the ablate stage does at home) and each grid
cell (:func:`pipeline.grid.log_gathered_cell`, the function that logs a cell gathered from a Slurm
node). Each run is tagged with its provenance (``source: offline bundle``, ``offline.host``,
``offline.device``, ``offline.torch``, ``offline.commit``, ``offline.manifest_digest``,
``offline.imported_at``; ``git_commit`` is the bundle's commit) and ``offline.content_digest``, the
sha256 of the files it was logged from: importing a bundle again adds nothing. Its ``params_hash``
tag is ``offline-<digest>``, never a real params hash, so no stage at home ever resumes, reopens or
adopts an imported run, and no run already in the store is touched. :func:`write_bundle_report`
writes the bundle's report (report.md, ablation.md, ablation.json, figures/) with ``pipeline.report``,
as the report stage does, and a README.md with the provenance.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import yaml

from .config import ConfigError, flatten
from .data.download import file_digest
from .io import atomic_dir, atomic_path, read_json, write_json, write_text

FORMAT = "simformer-offline-bundle/1"
MANIFEST, PARAMS_FILE, PIPELINE_FILE, LOGS, OUTPUTS = "manifest.json", "params.yaml", "dvc.yaml", "logs", "outputs"
GRID_STAGE = "ablate"           # its outputs (the cell folders) travel although DVC caches them
REPORT_STAGE = "report"         # its command names every file the report reads: the bundle's report reads them too
PSEUDO_STAGE = "retrain"        # chosen by default only with pseudo.enabled
MODEL_STAGES = ("train", "ablate")      # their model files travel with keep_models
MAX_MIB = 16.0                  # the most the GPU machine returns per file
# what the stages import besides the standard library (requirements.txt without dvc, mlflow, submitit,
# psutil and pytest): checked before any stage runs
NEEDED_MODULES = ("yaml", "numpy", "scipy", "pandas", "cv2", "matplotlib", "tqdm", "torch", "torchvision")
REPORT_README_TITLE = "# Offline run"   # the first line of the README.md a bundle's report folder gets


# ============================================================================ the pipeline (dvc.yaml)

@dataclass(frozen=True)
class Output:
    path: str
    kind: str           # outs | metrics | plots
    cache: bool
    persist: bool


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    deps: tuple[str, ...]
    outputs: tuple[Output, ...]

    def argv(self, python: str = sys.executable) -> list[str]:
        """The command as argv, run by ``python``."""
        argv = shlex.split(self.cmd)
        if argv[:2] != ["python", "-m"] or len(argv) < 3:
            raise ValueError(f"dvc.yaml stage '{self.name}': expected a `python -m <module> ...` command, "
                             f"got {self.cmd!r}")
        return [python, *argv[1:]]

    def args(self) -> dict[str, str]:
        """The command's ``--option value`` pairs (its paths)."""
        argv = shlex.split(self.cmd)
        return {a: b for a, b in zip(argv, argv[1:]) if a.startswith("--") and not b.startswith("--")}


def read_pipeline(path) -> dict[str, Stage]:
    """The stages of a dvc.yaml, in its order (errors name the file and the stage)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise FileNotFoundError(f"cannot read the pipeline '{path}': {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"the pipeline '{path}' is not valid YAML: {e}") from None
    stages = doc.get("stages") if isinstance(doc, dict) else None
    if not isinstance(stages, dict) or not stages:
        raise ValueError(f"the pipeline '{path}' has no stages")
    out = {}
    for name, s in stages.items():
        if not isinstance(s, dict) or not isinstance(s.get("cmd"), str):
            raise ValueError(f"the pipeline '{path}': stage '{name}' has no `cmd` string")
        outputs = []
        for kind in ("outs", "metrics", "plots"):
            for o in s.get(kind) or []:
                p, opts = next(iter(o.items())) if isinstance(o, dict) else (o, None)
                opts = opts or {}
                outputs.append(Output(str(p), kind, bool(opts.get("cache", True)), bool(opts.get("persist", False))))
        out[str(name)] = Stage(str(name), " ".join(s["cmd"].split()), tuple(str(d) for d in s.get("deps") or []),
                               tuple(outputs))
    return out


def _overlap(a: str, b: str) -> bool:
    a, b = os.path.normpath(a), os.path.normpath(b)
    return a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep)


def default_stages(stages: Mapping[str, Stage], pseudo: bool) -> list[str]:
    """The stages the ablation grid and the report need (followed through their deps to the stages
    whose outputs they are), in dvc.yaml order; the pseudo-label retraining only when ``pseudo``."""
    need: set[str] = set()
    todo = [s for s in (GRID_STAGE, REPORT_STAGE) if s in stages]
    while todo:
        name = todo.pop()
        if name in need or (name == PSEUDO_STAGE and not pseudo):
            continue
        need.add(name)
        todo += [other.name for other in stages.values() if other.name != name
                 and any(_overlap(d, o.path) for d in stages[name].deps for o in other.outputs)]
    return [s for s in stages if s in need]


def select_stages(stages: Mapping[str, Stage], names: Sequence[str] | None, pseudo: bool) -> list[str]:
    """``names`` (in dvc.yaml order; an unknown one is an error listing the stages), else :func:`default_stages`."""
    if not names:
        return default_stages(stages, pseudo)
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise ConfigError(f"--stages {unknown[0]!r} is not a stage of dvc.yaml; stages: {', '.join(stages)}")
    return [s for s in stages if s in names]


# ============================================================================ params with -S overrides

def apply_overrides(raw: Mapping, overrides: Sequence[str]) -> dict:
    """A copy of the params mapping ``raw`` with each ``KEY=VALUE`` set, in order (the last one for a key
    wins), as ``dvc exp run -S`` does: a dotted key (``loss.pp_weight``, ``ablation.variants.pp2.loss.pp_weight``;
    ``params.yaml:`` and Hydra's ``+`` / ``++`` prefixes are accepted) and a YAML value (``0.5``, ``[6,7]``,
    ``{loss: {pp_weight: 2.0}}``; empty: ``''``). The result is not validated here."""
    out = copy.deepcopy(dict(raw))
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().split(":", 1)[-1].lstrip("+")
        if not sep or not key or any(not k for k in key.split(".")):
            raise ConfigError(f"-S {item!r}: expected KEY=VALUE, e.g. -S loss.pp_weight=0.5")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"-S {item}: the value is not valid YAML ({e})") from None
        *groups, last = key.split(".")
        node = out
        for i, g in enumerate(groups):
            if g not in node:
                node[g] = {}            # an unknown group: validation names it
            if not isinstance(node[g], dict):
                raise ConfigError(f"-S {item}: params key '{'.'.join(groups[:i + 1])}' is a value, not a group")
            node = node[g]
        node[last] = parsed
    return out


def effective_params(params_file, overrides: Sequence[str]):
    """``(text, raw, params, changed)``: the params file with ``overrides`` applied (:func:`apply_overrides`),
    validated as every stage validates its params file (a ConfigError names the file, the flags and the
    key); ``changed`` is ``{key: [new, old]}``. Without overrides ``text`` is the file's own."""
    from .cli import load_params_raw, validate_params
    p, text, raw, _ = load_params_raw(Path(params_file))
    if not overrides:
        return text, raw, p, {}
    new = apply_overrides(raw, overrides)
    flags = " ".join(shlex.quote(f"-S{o}") if " " in o else f"-S {o}" for o in overrides)
    try:
        p, _ = validate_params(new)
    except ConfigError as e:
        raise ConfigError(f"{params_file} with {flags}: {e}") from None
    old_flat, new_flat = flatten(raw), flatten(new)
    changed = {k: [new_flat.get(k), old_flat.get(k)] for k in sorted(set(old_flat) | set(new_flat))
               if new_flat.get(k) != old_flat.get(k)}
    text = (f"# {Path(params_file).name} with {flags} (tools.offline_run)\n"
            + yaml.safe_dump(new, sort_keys=False, allow_unicode=True))
    return text, new, p, changed


# ============================================================================ this machine

def _version(dist: str) -> str | None:
    import importlib.metadata
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    import platform
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(train_device: str, eval_device: str) -> dict:
    """The machine as the stages see it: versions, the devices ``train.device`` / ``eval.device``
    resolve to (a ValueError naming the key when CUDA is asked for and absent) and the device's name.
    Imports torch (and initialises CUDA): :func:`probe` runs it in a child process."""
    import platform

    import torch

    from .engine.device import resolve_device
    from .jobs import cores
    train, evaluate = resolve_device(train_device, "train.device"), resolve_device(eval_device, "eval.device")
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    cpu = _cpu_name()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": _version("torchvision"), "cuda_runtime": torch.version.cuda,
            "train_device": train.type, "eval_device": evaluate.type,
            "device_name": gpus[0] if train.type == "cuda" else cpu, "gpus": gpus, "cpu": cpu, "cores": cores()}


_PROBE = ("import json\nfrom pipeline.offline import machine\n"
          "try:\n    print(json.dumps(machine({train!r}, {evaluate!r})))\n"
          "except ValueError as e:\n    print(json.dumps({{'error': str(e)}}))\n")


def probe(root: Path, train_device: str, eval_device: str, env: Mapping[str, str]) -> dict:
    """:func:`machine` in a child process run like the stages (so this process never holds a CUDA context)."""
    r = subprocess.run([sys.executable, "-c", _PROBE.format(train=train_device, evaluate=eval_device)], cwd=root,
                       env=dict(env), capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not r.stdout.strip():
        raise RuntimeError(f"probing this machine (torch, the device) failed: {r.stderr.strip()[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if "error" in out:
        raise ValueError(out["error"])
    return out


def check_modules(names: Sequence[str] = NEEDED_MODULES) -> None:
    """A clear error before any stage runs when a module the stages import is not installed."""
    import importlib.util
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise RuntimeError(f"the stages need Python modules that are not installed here: {', '.join(missing)} "
                           "(requirements.txt has their versions; dvc and mlflow are not needed)")


# ============================================================================ running the stages

def _stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"       # each line of a stage's output reaches its log as it is printed
    for k in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        env.pop(k, None)                # not a DVC run
    return env


def stage_flags(argv: Sequence[str], cwd: Path, env: Mapping[str, str]) -> list[str]:
    """``--no-progress`` and, when the stage takes it, ``--no-mlflow`` (read from its ``--help``)."""
    r = subprocess.run([*argv[:3], "--help"], cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"`python -m {argv[2]} --help` failed: {r.stderr.strip()[-2000:]}")
    return [f for f in ("--no-progress", "--no-mlflow") if re.search(rf"^\s+{f}\b", r.stdout, re.M)]


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)        # the stage unwinds as on Ctrl-C (pipeline.cli.run)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_stage(argv: Sequence[str], cwd: Path, env: Mapping[str, str], log: Path, echo: Callable[[str], None]) -> int:
    """Run one stage, its output echoed line by line and written to ``log``; its exit status. Ctrl-C or
    SIGTERM here stops it with SIGTERM first."""
    lines: list[str] = []
    proc = subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    try:
        for line in proc.stdout:
            lines.append(line)
            echo(line)
        return proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        proc.stdout.close()
        write_text(log, "".join(lines))


def bundled_files(stages: Mapping[str, Stage], ran: Sequence[str], root: Path, keep_models: bool) -> list[str]:
    """The files of the stages ``ran`` that a bundle holds, relative to ``root`` (see the module docstring)."""
    picked = set()
    for name in ran:
        for o in stages[name].outputs:
            if o.persist or (o.kind == "outs" and o.cache and name != GRID_STAGE
                             and not (keep_models and name in MODEL_STAGES)):
                continue
            src = root / o.path
            files = [src] if src.is_file() else sorted(f for f in src.rglob("*") if f.is_file()) if src.is_dir() else []
            for f in files:
                rel = f.relative_to(root)
                if any(part.startswith(".") for part in rel.parts):      # atomic writers' temporaries
                    continue
                if f.suffix == ".pt" and not keep_models:
                    continue
                picked.add(rel.as_posix())
    return sorted(picked)


def pack(folder: Path, tar: Path) -> int:
    """``folder`` as a .tar.gz at ``tar`` (its top folder: ``folder``'s name); the size in bytes."""
    def keep(info: tarfile.TarInfo):
        name = Path(info.name).name
        return None if name.startswith(".") or name == tar.name else info

    with atomic_path(tar, suffix=".tmp") as tmp:
        with tarfile.open(tmp, "w:gz") as tf:
            tf.add(folder, arcname=folder.name, filter=keep)
    return tar.stat().st_size


def check_size(tar: Path, max_mib: float, files: Mapping[str, Mapping], folder: Path, keep_models: bool) -> None:
    """A ValueError when the tarball ``tar`` is over ``max_mib``, naming its size and largest files."""
    size = tar.stat().st_size
    if size <= max_mib * 2 ** 20:
        return
    biggest = sorted(files.items(), key=lambda kv: -kv[1]["bytes"])[:3]
    raise ValueError(f"the bundle {tar} is {size / 2 ** 20:.1f} MiB, over the {max_mib:g} MiB limit; its largest "
                     "files: " + ", ".join(f"{k} ({v['bytes'] / 2 ** 20:.1f} MiB)" for k, v in biggest)
                     + (" (leave out --keep-models)" if keep_models else "") + f". The folder {folder} holds it all")


def _utc(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_offline(pipeline_file, params_file, out, *, overrides: Sequence[str] = (), stages: Sequence[str] | None = None,
                device: str | None = None, keep_models: bool = False, tar=None, max_mib: float = MAX_MIB,
                commit: str | None = None, command: str = "", echo: Callable[[str], None] | None = None) -> dict:
    """Run the stages of ``pipeline_file`` (a dvc.yaml; they run from its folder, ``root``) with the params
    of ``params_file`` and ``overrides``, without DVC and MLflow, and write the bundle ``out`` and its
    .tar.gz (module docstring). ``device`` (auto / cpu / cuda) sets ``train.device`` and ``eval.device``
    like ``-S``; ``commit`` is recorded when ``root`` is no git checkout (a copied working tree).
    Everything is checked before ``out`` is made: the params and overrides, the stages, the modules the
    stages import, the device, and that ``out`` and the tarball are new. A failed stage stops the run;
    the bundle then holds what ran, with its logs, and the error names the stage. Returns the manifest."""
    from .repo import git_commit, git_dirty
    echo = echo or (lambda line: (sys.stdout.write(line), sys.stdout.flush()))
    root = Path(pipeline_file).resolve().parent
    pipeline = read_pipeline(pipeline_file)
    overrides = [*overrides, *([f"train.device={device}", f"eval.device={device}"] if device else [])]
    text, raw, p, changed = effective_params(params_file, overrides)
    names = select_stages(pipeline, stages, p.pseudo.enabled)
    argvs = {n: pipeline[n].argv() for n in names}
    out = Path(out).resolve()
    tar = Path(tar).resolve() if tar else out.with_name(out.name + ".tar.gz")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out '{out}' exists and is not an empty folder: a bundle is never overwritten")
    if tar.exists():
        raise ValueError(f"the bundle's tarball '{tar}' exists already: a bundle is never overwritten")
    check_modules()
    env = _stage_env()
    where = probe(root, p.train.device, p.eval.device, env)
    found = git_commit(root)
    git = ({"commit": found, "dirty": git_dirty(root), "from": "git"} if found != "unknown" else
           {"commit": commit, "dirty": None, "from": "--commit"} if commit else
           {"commit": "unknown", "dirty": None, "from": "no git checkout and no --commit"})

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / PARAMS_FILE, text)
    write_text(out / PIPELINE_FILE, Path(pipeline_file).read_text())
    started = time.time()
    manifest = {"format": FORMAT, "status": "running", "command": command, "overrides": list(overrides),
                "changed": changed, "params_file": str(params_file), "params_text": text, "git": git,
                "host": socket.gethostname(), "machine": where, "started_utc": _utc(started), "finished_utc": None,
                "wall_seconds": None, "stages": [], "keep_models": keep_models, "files": {}}
    write_json(out / MANIFEST, manifest)
    echo(f"offline run of {len(names)} stages ({', '.join(names)}) on {where['device_name']} "
         f"({where['train_device']}), bundle {out}\n")
    ran, failed = [], None
    try:
        for name in names:
            argv = argvs[name] + ["--params", str(out / PARAMS_FILE), *stage_flags(argvs[name], root, env)]
            echo(f"== {name}: {shlex.join(['python', *argv[1:]])}\n")
            t0 = time.monotonic()
            rc = run_stage(argv, root, env, out / LOGS / f"{name}.log", echo)
            manifest["stages"].append({"name": name, "command": shlex.join(["python", *argv[1:]]),
                                       "seconds": round(time.monotonic() - t0, 3), "returncode": rc})
            write_json(out / MANIFEST, manifest)
            if rc != 0:
                failed = name
                break
            ran.append(name)
    except BaseException:
        manifest.update(status="interrupted", finished_utc=_utc(), wall_seconds=round(time.time() - started, 3))
        write_json(out / MANIFEST, manifest)
        raise
    files = bundled_files(pipeline, ran, root, keep_models)
    with atomic_dir(out / OUTPUTS) as tmp:
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, tmp / rel)
    manifest.update(status="failed" if failed else "complete", failed_stage=failed, finished_utc=_utc(),
                    wall_seconds=round(time.time() - started, 3),
                    files={rel: {"bytes": (out / OUTPUTS / rel).stat().st_size, "sha256": file_digest(out / OUTPUTS / rel)}
                           for rel in files})
    write_json(out / MANIFEST, manifest)
    size = pack(out, tar)
    manifest["tarball"] = {"path": str(tar), "bytes": size}
    if failed:
        raise RuntimeError(f"stage '{failed}' failed (exit {manifest['stages'][-1]['returncode']}): its output is in "
                           f"{out / LOGS / (failed + '.log')}; the bundle of what ran is {tar}")
    check_size(tar, max_mib, manifest["files"], out, keep_models)
    echo(f"bundle: {out} ({len(files)} files), {tar} ({size / 2 ** 20:.2f} MiB); "
         f"{manifest['wall_seconds']:.0f} s\n")
    return manifest


# ============================================================================ reading a bundle

@contextlib.contextmanager
def open_bundle(path) -> Iterator[Path]:
    """The bundle folder of ``path`` (a bundle folder, or its .tar.gz unpacked into a temporary folder)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"bundle '{path}' does not exist")
    if path.is_dir():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="simformer-bundle-") as tmp:
        try:
            with tarfile.open(path, "r:*") as tf:
                tf.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"bundle '{path}' is neither a bundle folder nor a .tar.gz of one: {e}") from None
        found = sorted(m.parent for m in Path(tmp).glob(f"*/{MANIFEST}"))
        if len(found) != 1:
            raise ValueError(f"bundle '{path}': expected one folder with a {MANIFEST} in the archive, "
                             f"found {len(found)}")
        yield found[0]


@dataclass
class Bundle:
    """A bundle folder, read and checked: its manifest (and the manifest's sha256), params and pipeline."""
    folder: Path
    manifest: dict
    digest: str
    params_text: str
    raw: dict
    params: object              # pipeline.config.Params
    grid: object                # pipeline.config.AblationConfig or None
    stages: dict

    @classmethod
    def read(cls, folder) -> "Bundle":
        from .cli import validate_params
        folder = Path(folder)
        mpath = folder / MANIFEST
        if not mpath.is_file():
            raise ValueError(f"'{folder}' is not an offline bundle: it has no {MANIFEST}")
        data = mpath.read_bytes()
        try:
            m = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"'{mpath}' is not valid JSON: {e}") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise ValueError(f"'{mpath}': not a manifest of format {FORMAT}")
        if m.get("status") != "complete":
            raise ValueError(f"bundle '{folder}' is not complete (status {m.get('status')!r}"
                             + (f", stage '{m['failed_stage']}' failed" if m.get("failed_stage") else "")
                             + "): nothing is imported from it")
        for rel, info in m["files"].items():
            f = folder / OUTPUTS / rel
            if not f.is_file() or file_digest(f) != info["sha256"]:
                raise ValueError(f"bundle '{folder}': {OUTPUTS}/{rel} is missing or differs from its manifest "
                                 "(sha256): the bundle was changed after it was written")
        raw = yaml.safe_load(m["params_text"]) or {}
        try:
            params, grid = validate_params(raw)
        except ConfigError as e:
            raise ConfigError(f"bundle '{folder}': its params: {e}") from None
        return cls(folder, m, hashlib.sha256(data).hexdigest(), m["params_text"], raw, params, grid,
                   read_pipeline(folder / PIPELINE_FILE))

    def output(self, stage: str, flag: str) -> Path | None:
        """The bundled file or folder a stage's command names with ``flag`` (None when the bundle lacks it)."""
        rel = self.stages[stage].args().get(flag) if stage in self.stages else None
        path = self.folder / OUTPUTS / rel if rel else None
        return path if path is not None and path.exists() else None

    def cell_jobs(self) -> list:
        """The grid's cells as :class:`pipeline.grid.CellJob` over the bundled cell folders (planned as the
        ablate stage plans them; the dataset is not in the bundle), in the grid's order; [] without cells."""
        from .grid import plan_cells
        cells = self.output(GRID_STAGE, "--out")
        if self.grid is None or cells is None:
            return []
        a = self.stages[GRID_STAGE].args()
        at = {k: self.folder / OUTPUTS / a[k]
              for k in ("--dataset-dir", "--split-dir", "--main-model", "--checkpoints")}
        jobs, _, _ = plan_cells(self.params, self.raw, self.grid, self.params_text, dataset_dir=at["--dataset-dir"],
                                split_dir=at["--split-dir"], init=None, main_model=at["--main-model"],
                                checkpoints=at["--checkpoints"], out=cells, cores=1, mlflow=False, progress=False)
        from .ablation import grid_cells
        order = {c.key: i for i, c in enumerate(grid_cells(self.grid, self.params.data.split))}
        return sorted((j for j in jobs if (j.out / "cell.json").is_file()), key=lambda j: order.get(j.key, 0))


def _digest(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + bytes.fromhex(file_digest(f)))
    return h.hexdigest()


def _cell_files(job) -> list[Path]:
    from .report.ablation import CELL_FILES
    return [job.out / name for name in CELL_FILES]


# ============================================================================ importing into MLflow

def provenance_tags(b: Bundle, imported_at: str) -> dict[str, str]:
    """The tags every run imported from ``b`` carries (``git_commit``: the bundle's commit)."""
    m, where = b.manifest, b.manifest["machine"]
    commit = str(m["git"]["commit"])
    return {"source": "offline bundle", "offline.bundle": b.folder.name, "offline.host": str(m["host"]),
            "offline.device": f"{where['device_name']} ({where['train_device']})", "offline.torch": str(where["torch"]),
            "offline.commit": commit, "offline.dirty": str(m["git"]["dirty"]), "offline.manifest_digest": b.digest,
            "offline.started_utc": str(m["started_utc"]), "offline.imported_at": imported_at,
            "git_commit": commit, "mlflow.source.git.commit": commit, "dvc_exp_name": "offline"}


def import_bundle(path, root, experiment: str | None = None, say: Callable[[str], None] = print) -> dict:
    """Log the bundle at ``path`` into the MLflow store of ``root`` as new runs (module docstring), in
    ``experiment`` (default: the one of the bundle's dataset and split). Returns
    ``{"created": {name: run_id}, "skipped": {name: run_id}}``; ``skipped``: imported before."""
    import pandas as pd

    from .ablation import main_run_name
    from .config import params_hash
    from .grid import log_gathered_cell
    from .tracking import experiment_name, find_runs, metric_key, open_client, open_tracker

    created, skipped = {}, {}
    with open_bundle(path) as folder:
        b = Bundle.read(folder)
        p = b.params
        client = open_client(root)
        exp_name = experiment or experiment_name(p.data.dataset, p.data.split)
        prov = provenance_tags(b, _utc())
        suffix = "@offline"

        def imported(digest: str) -> str | None:
            """The run this content was imported into, finished and with its metrics (logged last)."""
            exp = client.get_experiment_by_name(exp_name)
            runs = find_runs(client, exp.experiment_id, {"offline.content_digest": digest}) if exp else []
            return next((r.info.run_id for r in runs if r.info.status == "FINISHED" and "mIoU" in r.data.metrics),
                        None)

        jobs = b.cell_jobs()
        shared = [j for j in jobs if j.shared]
        main = {k: b.output(REPORT_STAGE, k) for k in ("--metrics", "--per-class", "--curve")}
        if None not in main.values():
            digest = _digest(list(main.values()) + [f for j in shared for f in _cell_files(j)])
            name = main_run_name(b.grid, p.base.seed) + suffix
            run_id = imported(digest)
            if run_id:
                skipped[name] = run_id
            else:
                phash = f"offline-{digest[:16]}"
                tags = {**prov, "stage": "train", "offline.content_digest": digest,
                        "offline.params_hash": params_hash(p)}
                metrics = {k: v for k, v in read_json(main["--metrics"]).items() if v is not None}
                with open_tracker(p, b.params_text, tags, name, phash=phash, include_finished=True, root=root,
                                  experiment=exp_name) as tracker:
                    logged = tracker.client.get_run(tracker.run_id).data.metrics
                    if not logged and main["--curve"].stat().st_size > 1:      # the curve, then the metrics last
                        for rec in pd.read_csv(main["--curve"]).to_dict("records"):
                            tracker.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=int(rec["step"]))
                    if any(metric_key(k) not in logged for k in metrics):
                        for f in (main["--metrics"], main["--per-class"]):
                            tracker.log_artifact(f, "eval")
                        if (model := b.output("train", "--model")) is not None:      # bundled with --keep-models
                            tracker.log_artifact(model, "model")
                        tracker.log_metrics(metrics)
                    run_id = tracker.run_id
                for j in shared:            # the cell that is the main training: into the same run, as at home
                    log_gathered_cell(j, tags={**prov, "offline.content_digest": digest}, phash=phash,
                                      experiment=exp_name, executor="offline", record=False)
                created[name] = run_id
            say(f"main model: {'already imported as' if name in skipped else 'run'} {run_id}")
        for j in jobs:
            if j.shared and None not in main.values():
                continue
            digest = _digest(_cell_files(j))
            name = f"{j.run_name}{suffix}"
            run_id = imported(digest)
            if run_id:
                skipped[name] = run_id
            else:
                created[name] = log_gathered_cell(
                    j, tags={**prov, "offline.content_digest": digest, "offline.params_hash": params_hash(j.params)},
                    phash=f"offline-{digest[:16]}", experiment=exp_name, name=name, executor="offline", record=False)
            say(f"cell {j.key}: {'already imported as' if name in skipped else 'run'} "
                f"{skipped.get(name) or created.get(name)}")
    say(f"MLflow experiment '{exp_name}': {len(created)} new run{'s' * (len(created) != 1)}, "
        f"{len(skipped)} imported before (tags.`offline.manifest_digest` = '{b.digest}')")
    return {"created": created, "skipped": skipped, "experiment": exp_name}


# ============================================================================ the bundle's report

def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600} h {s % 3600 // 60} min {s % 60} s" if s >= 3600 else f"{s // 60} min {s % 60} s"


def readme_text(b: Bundle, files: Sequence[str]) -> str:
    """The provenance of a bundle's report folder."""
    m, where = b.manifest, b.manifest["machine"]
    git = m["git"]
    dirty = {True: " (with uncommitted changes)", False: "", None: ""}[git.get("dirty")]
    n_cells = len(b.cell_jobs())
    lines = [f"{REPORT_README_TITLE}: {b.folder.name}", "",
             f"{', '.join(f'`{f}`' for f in files)} are written by `pipeline/report` from the offline bundle "
             f"`{b.folder.name}` ({n_cells} grid cells; `python -m tools.import_runs <bundle> --report-out <folder>`); "
             "nothing was pasted.", "",
             f"- device: {where['device_name']} ({where['train_device']}; eval on {where['eval_device']}), "
             f"host `{m['host']}`, {where['cores']} CPU cores",
             f"- commit: `{git['commit']}`{dirty} (from {git['from']})",
             f"- date: {m['started_utc']} to {m['finished_utc']}; wall time {_duration(m['wall_seconds'])}",
             "- per stage: " + ", ".join(f"{s['name']} {_duration(s['seconds'])}" for s in m["stages"]),
             f"- torch {where['torch']}, torchvision {where['torchvision']}, Python {where['python']}"
             + (f", CUDA {where['cuda_runtime']}" if where.get("cuda_runtime") else ""),
             f"- command: `{m['command']}`" if m.get("command") else "- command: (not recorded)"]
    if m["changed"]:
        lines.append("- params changed from the params file: " + "; ".join(
            f"`{k}` {new!r} (was {old!r})" for k, (new, old) in m["changed"].items()))
    else:
        lines.append("- params: the params file as it was, no `-S` overrides")
    lines += [f"- manifest sha256: `{b.digest}` (the MLflow tag `offline.manifest_digest` of the imported runs)", ""]
    return "\n".join(lines)


def write_bundle_report(path, dest) -> list[str]:
    """Write the report of the bundle at ``path`` into the folder ``dest`` (report.md, ablation.md,
    ablation.json, figures/, README.md), with ``pipeline.report`` as the report stage writes it.
    ``dest`` must be new, empty or a folder this function wrote before (it is then replaced whole).
    Returns the files written, relative to ``dest``."""
    import pandas as pd

    from .ablation import main_run_name
    from .report import Inputs, write_report
    from .report.build import data_setting, grid_inputs

    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        readme = dest / "README.md"
        first = readme.read_text().splitlines()[:1] if readme.is_file() else []
        if not first or not first[0].startswith(REPORT_README_TITLE):
            raise ValueError(f"--report-out '{dest}' holds other files: give a new or empty folder (or one this "
                             "command wrote before)")
    with open_bundle(path) as folder:
        b = Bundle.read(folder)
        p, g, m = b.params, b.grid, b.manifest
        need = {k: b.output(REPORT_STAGE, k) for k in ("--metrics", "--per-class", "--curve")}
        missing = [b.stages[REPORT_STAGE].args().get(k, k) for k, v in need.items() if v is None]
        if missing:
            raise FileNotFoundError(f"bundle '{b.folder}' lacks {', '.join(missing)}: the stages that write them "
                                    "did not run offline")
        cells = b.output(GRID_STAGE, "--out")
        grid, pp_weights, novel_masks = (grid_inputs(cells, b.raw, g, p.train.iterations) if cells and g
                                         else (None, {}, {}))
        retrain = b.output(REPORT_STAGE, "--retrain-metrics")
        baselines = b.output(REPORT_STAGE, "--baselines")
        with atomic_dir(dest) as tmp:
            inputs = Inputs(
                title=p.report.title, dataset=p.data.dataset, split=p.data.split, metrics=read_json(need["--metrics"]),
                per_class=pd.read_csv(need["--per-class"], keep_default_na=False, na_values=[""]),
                curve=pd.read_csv(need["--curve"]), report_dir=tmp, figures_dir=tmp / "figures",
                smoothing=p.report.smoothing, retrain=read_json(retrain).get("retrain") if retrain else None, grid=grid,
                run={"commit": m["git"]["commit"], "experiment": f"offline bundle {b.folder.name}",
                     "date": m["finished_utc"].replace("T", " ").replace("Z", " UTC"), "iterations": p.train.iterations,
                     "seed": p.base.seed, "changed": {k: tuple(v) for k, v in m["changed"].items()},
                     "main_run": main_run_name(g, p.base.seed)},
                qualitative=None, baselines=read_json(baselines) if baselines else None, pp_weights=pp_weights,
                novel_masks=novel_masks, data_setting=data_setting(p))
            write_report(inputs, tmp / "report.md", None, tmp / "ablation.md", tmp / "ablation.json")
            files = sorted(f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file())
            shown = [f for f in ("report.md", "ablation.md", "ablation.json") if f in files] + ["figures/"]
            write_text(tmp / "README.md", readme_text(b, shown))
    return sorted([*files, "README.md"])
