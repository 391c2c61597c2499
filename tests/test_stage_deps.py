"""dvc.yaml declares everything a stage's results depend on, so that DVC never misses a change:

* code: every project module the stage can load (its import closure, lazy imports inside
  functions included), every module it did load when run, and the data files those modules
  read beside them (``pipeline/data/*.json``) are covered by the stage's ``deps``;
* inputs: every path of the stage's command that is not one of its outputs is a dep;
* params: every params key the stage reads when run is covered by its ``params``.

The stages are run for real (tiny config, in subprocesses, each with the command of
``dvc.yaml``) with a recorder of the project modules loaded and the params keys read.
"""
from __future__ import annotations

import ast
import functools
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import module_dir
from tests.helpers import ROOT, small_params

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PROJECT = ("pipeline", "stages")
# Command paths that are neither deps nor outputs, and why.
NOT_DEPS = {"data/raw": "download cache of the official archives (verified by checksum), not a result"}
# Project modules no stage's DVC outputs depend on, and why.
NOT_CODE_DEPS = {"pipeline/tracking.py": "MLflow logging only: it computes no DVC output (and a DVC run-cache "
                                         "hit restores the outputs without running it)",
                 "pipeline/repo.py": "the repository's root (for the MLflow store) and git commit: run metadata, "
                                     "no computed result depends on it",
                 "pipeline/serving.py": "the MLflow pyfunc wrapper of a trained model: MLflow logging only",
                 "pipeline/jobs.py": "how many CPU threads a run uses and the pool that runs ablation cells side by "
                                     "side: no DVC output depends on it (the thread count follows params the stage "
                                     "declares and is recorded in cell.json and an MLflow tag; README, "
                                     "Reproducibility)"}


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _resolve_import(path: Path, node: ast.ImportFrom) -> str:
    package = list(path.relative_to(ROOT).with_suffix("").parts)[:-1]
    base = node.module or ""
    if node.level:
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    return base


@functools.lru_cache(maxsize=None)
def _units(path: Path) -> dict[str, tuple[frozenset, frozenset]]:
    """The module's units - each top-level function and class, and '<module>' (every other
    statement) - with the project modules each imports and the names it refers to."""
    units = {}
    for node in ast.parse(path.read_text()).body:
        name = node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else "<module>"
        mods, names = set(), set()
        for n in ast.walk(node):
            if isinstance(n, ast.Import):
                mods.update(a.name for a in n.names)
            elif isinstance(n, ast.ImportFrom):
                base = _resolve_import(path, n)
                mods.add(base)
                mods.update(f"{base}.{a.name}" for a in n.names)     # `from package import module`
                names.update(a.name for a in n.names)
            elif isinstance(n, ast.Name):
                names.add(n.id)
            elif isinstance(n, ast.Attribute):
                names.add(n.attr)
        old = units.get(name, (frozenset(), frozenset()))
        units[name] = (old[0] | {m for m in mods if m.split(".")[0] in PROJECT}, old[1] | names)
    return units


def import_closure(module: str) -> set[Path]:
    """The project modules ``module`` can load: imports at module level, and imports inside a
    function or class that some counted code refers to by name (so a helper module's lazy
    import counts only for the stages that use that helper). All of ``module`` counts."""
    entry = _module_file(module)
    files: set[Path] = set()
    counted: set[tuple[Path, str]] = set()
    referenced: set[str] = set()
    todo = [module]
    changed = True
    while changed:
        changed = False
        while todo:
            name = todo.pop()
            path = _module_file(name)
            if path is not None and path not in files:
                files.add(path)
                todo += [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]   # parents
        for path in list(files):
            for unit, (mods, names) in _units(path).items():
                if (path, unit) in counted or not (path == entry or unit == "<module>" or unit in referenced):
                    continue
                counted.add((path, unit))
                todo += list(mods)
                referenced |= names
                changed = True
    return files


def data_files(module: Path) -> set[Path]:
    """Files beside ``module`` that it names in a string literal (e.g. ``"splits.json"``)."""
    strings = {n.value for n in ast.walk(ast.parse(module.read_text()))
               if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return {f for f in module.parent.iterdir() if f.suffix != ".py" and f.is_file() and f.name in strings}


def _no_code(path: Path) -> bool:
    """A module of a docstring and ``__dunder__`` constants only (``__version__``) computes nothing."""
    return all((isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) or
               (isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id.startswith("__") for t in n.targets))
               for n in ast.parse(path.read_text()).body)


def _needed(rel: str) -> bool:
    return rel not in NOT_CODE_DEPS and not _no_code(ROOT / rel)


def _covered(rel: str, entries: list[str]) -> bool:
    return any(rel == e or rel.startswith(e.rstrip("/") + "/") or rel.startswith(e + ".") for e in entries)


def _entries(items) -> list[str]:
    """dvc.yaml list entries: plain strings or {path: options} mappings (params: {file: [keys]})."""
    out = []
    for it in items or []:
        if isinstance(it, str):
            out.append(it)
        elif isinstance(it, dict):
            for k, v in it.items():
                out += list(v) if isinstance(v, list) else [k]
    return out


def _cmd(stage: str, key: str = "baseline-6") -> list[str]:
    cmd = " ".join(DVC[stage]["cmd"].split()) if isinstance(DVC[stage]["cmd"], str) else DVC[stage]["cmd"]
    variant, seed = key.rsplit("-", 1)
    cmd = cmd.replace("${item.variant}", variant).replace("${item.seed}", seed).replace("${key}", key)
    return shlex.split(cmd)


def _resolve(entries: list[str], key: str = "baseline-6") -> list[str]:
    variant, _ = key.rsplit("-", 1)
    return [e.replace("${item.variant}", variant).replace("${key}", key) for e in entries]


# ----------------------------------------------------------------------------- static checks
@pytest.mark.parametrize("stage", list(DVC))
def test_deps_cover_the_code_a_stage_can_load(stage):
    cmd = _cmd(stage)
    assert cmd[:3] == ["python", "-m", f"stages.{cmd[2].split('.', 1)[1]}"], cmd
    deps = _entries(DVC[stage].get("deps"))
    code = import_closure(cmd[2])
    code |= {f for m in code for f in data_files(m)}
    missing = sorted(rel for rel in (str(p.relative_to(ROOT)) for p in code)
                     if not _covered(rel, deps) and _needed(rel))
    assert not missing, f"dvc.yaml stage '{stage}' loads code it does not depend on: {missing}"


@pytest.mark.parametrize("stage", list(DVC))
def test_deps_cover_the_paths_of_the_command(stage):
    s = DVC[stage]
    deps = _resolve(_entries(s.get("deps")))
    outs = _resolve(_entries(s.get("outs")) + _entries(s.get("metrics")) + _entries(s.get("plots")))
    paths = [t for t in _cmd(stage) if t.split("/")[0] in ("data", "reports")]
    missing = [t for t in paths if not _covered(t, deps) and not _covered(t, outs) and t not in NOT_DEPS]
    assert not missing, f"dvc.yaml stage '{stage}' reads paths it does not depend on: {missing}"


def test_helpers_find_known_imports_and_files():
    closure = {str(p.relative_to(ROOT)) for p in import_closure("stages.prepare")}
    assert {"stages/prepare.py", "pipeline/cli.py", "pipeline/data/splits.py", "pipeline/config.py"} <= closure
    assert "pipeline/model/build.py" not in closure
    # lazy imports count only for the stages that call the helper holding them
    assert "pipeline/engine/metrics.py" not in closure and "pipeline/engine/metrics.py" in {
        str(p.relative_to(ROOT)) for p in import_closure("stages.evaluate")}
    assert {f.name for f in data_files(ROOT / "pipeline/data/catalog.py")} == {"classes.json", "splits.json"}
    assert _covered("pipeline/model/build.py", ["pipeline/model"]) and not _covered("pipeline/modelx.py",
                                                                                     ["pipeline/model"])
    assert _covered("loss.pp_weight", ["loss"]) and _covered("data.synthetic.num_train", ["data.synthetic"])
    assert not _covered("data.split", ["data.synthetic"])


# ----------------------------------------------------------------------------- run every stage
# Run in each stage's process: records the project modules loaded and the params keys read from
# the params file (reads by project code; serialisation such as params_hash / to_dict and the
# validation in build_params do not count), then runs the stage as `python -m stages.<name>`.
HARNESS = r'''
import atexit, dataclasses, json, os, runpy, sys, typing
root = os.environ["HARNESS_ROOT"]
sys.path.insert(0, root)
import pipeline.ablation, pipeline.cli, pipeline.config as C
read = set()
code_dirs = tuple(os.path.join(root, d) + os.sep for d in ("pipeline", "stages"))

def recording(cls, prefix):
    names = {f.name for f in dataclasses.fields(cls)}
    def getattribute(self, name):
        if name in names and sys._getframe(1).f_code.co_filename.startswith(code_dirs):
            read.add(f"{prefix}.{name}")
        return object.__getattribute__(self, name)
    return type("Recorded" + cls.__name__, (cls,), {"__getattribute__": getattribute})

classes = {}
def walk(tp, prefix):
    classes[tp] = recording(tp, prefix)
    hints = typing.get_type_hints(tp)
    for f in dataclasses.fields(tp):
        if dataclasses.is_dataclass(hints[f.name]):
            walk(hints[f.name], f"{prefix}.{f.name}")
for g, tp in C.GROUPS.items():
    walk(tp, g)

def recorded(obj):
    if not dataclasses.is_dataclass(obj):
        return obj
    kw = {f.name: recorded(object.__getattribute__(obj, f.name)) for f in dataclasses.fields(obj)}
    return classes.get(type(obj), type(obj))(**kw)

def build(raw, *a, **k):
    return recorded(C.build_params(raw, *a, **k))
# the params file's Params (and the ablation cells built from it); a model file's params are not recorded
pipeline.cli.build_params = build
pipeline.ablation.build_params = build

def dump():
    mods = sorted({os.path.relpath(m.__file__, root) for m in list(sys.modules.values())
                   if getattr(m, "__file__", None) and m.__file__.startswith(code_dirs)})
    with open(os.environ["HARNESS_OUT"], "w") as f:
        json.dump({"modules": mods, "params": sorted(read)}, f)
atexit.register(dump)
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
'''

ORDER = ["download", "prepare", "baselines", "pretrain", "train", "evaluate", "retrain", "ablate", "report"]


@pytest.fixture(scope="module")
def stage_runs(request, tmp_path_factory) -> dict:
    """Every stage of dvc.yaml run once, in order, on a tiny config: {stage: {modules, params}}."""
    assert sorted(ORDER) == sorted(DVC)
    project = module_dir(request, tmp_path_factory, "deps_project")
    raw = small_params(pseudo={"enabled": True, "iterations": 2})
    raw["train"]["iterations"] = 2
    raw["model"]["pretrained"] = "weak_shot"            # the pretrain stage's weights reach train / ablate / retrain
    raw["pretrain"].update({"iterations": 2, "batch_size": 2})
    raw["ablation"] = {"seeds": [6], "splits": [], "iterations": 2, "workers": 1, "run": ["baseline"],
                       "variants": {"baseline": raw["ablation"]["variants"]["baseline"]},
                       "executor": "local", "slurm": raw["ablation"]["slurm"]}
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "HARNESS_ROOT": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    runs = {}
    for stage in ORDER:
        cmd = _cmd(stage)
        text = (ROOT / "stages" / f"{stage}.py").read_text()
        extra = ["--no-progress"] + (["--no-mlflow"] if "add_inputs(" in text and "mlflow=False" not in text else [])
        out = project / f"{stage}.json"
        r = subprocess.run([sys.executable, "-c", HARNESS, cmd[2], *cmd[3:], *extra], cwd=project,
                           env={**env, "HARNESS_OUT": str(out)}, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{stage}: {r.stdout}\n{r.stderr}"
        runs[stage] = json.loads(out.read_text())
    return runs


@pytest.mark.parametrize("stage", ORDER)
def test_deps_cover_the_modules_a_stage_loaded(stage, stage_runs):
    deps = _entries(DVC[stage].get("deps"))
    loaded = stage_runs[stage]["modules"]
    assert f"stages/{stage}.py" in loaded and "pipeline/config.py" in loaded
    loaded += [str(f.relative_to(ROOT)) for m in loaded for f in data_files(ROOT / m)]
    missing = [m for m in loaded if not _covered(m, deps) and _needed(m)]
    assert not missing, f"dvc.yaml stage '{stage}' loaded code it does not depend on: {missing}"


@pytest.mark.parametrize("stage", ORDER)
def test_params_cover_the_keys_a_stage_read(stage, stage_runs):
    declared = _resolve(_entries(DVC[stage].get("params")))
    read = stage_runs[stage]["params"]
    if "params.yaml" in declared:               # the whole file
        assert read
        return
    if not DVC[stage].get("params"):            # e.g. baselines: a function of the data alone
        assert not read, f"dvc.yaml stage '{stage}' declares no params but reads {read}"
        return
    assert read, f"no params read by '{stage}' were recorded"
    missing = [k for k in read if not _covered(k, declared)]
    assert not missing, f"dvc.yaml stage '{stage}' reads params it does not declare: {missing}"
