"""The pipeline run where neither DVC nor MLflow is installed (`python -m tools.offline_run`), and its
bundle imported into an MLflow store (`python -m tools.import_runs`; pipeline/offline.py).

One tiny project (64 px images, a tiny model, 4 steps, a grid of two variants and one seed whose
cells run in two spawned workers) is run offline once per module, in a subprocess whose every Python
process (the tool, each stage, the grid's spawned workers) has a finder in front of sys.meta_path
that refuses `mlflow` and `dvc` and records each attempt: the run must never try."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import module_dir
from tests.helpers import ROOT, make_project, project_env, run_module, tiny_params

GRID_STAGES = ["download", "prepare", "baselines", "pretrain", "train", "evaluate", "ablate", "report"]
CELLS = ["baseline-3", "full-3"]
CELL_FILES = ["cell.json", "curve.csv", "metrics.json", "per_class_iou.csv"]

GUARD = '''
import atexit, os, sys
BLOCKED = ("mlflow", "dvc")

def _note(path, text):
    with open(os.environ[path], "a") as f:
        f.write(f"{os.getpid()} {' '.join(sys.orig_argv[1:]).replace(chr(10), ' ')[:160]}: {text}\\n")

class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            _note("GUARD_LOG", f"import {name}")
            raise ModuleNotFoundError(f"{name} is not installed here (the offline test blocks it)", name=name)
        return None

sys.meta_path.insert(0, _Refuse())
_note("GUARD_SEEN", "guarded")

@atexit.register
def _leaks():
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    if leaked:
        _note("GUARD_LOG", "in sys.modules: " + ", ".join(leaked))
'''


def guarded_env(folder: Path) -> dict:
    """The environment of a process tree in which importing mlflow or dvc fails and is recorded."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(GUARD)
    env = project_env()
    env.update({"PYTHONPATH": str(folder), "GUARD_LOG": str(folder / "imports.log"),
                "GUARD_SEEN": str(folder / "seen.log")})
    return env


def run_tool(name: str, *argv) -> int:
    """``python -m tools.<name> argv...`` in-process: its exit status."""
    return run_module(f"tools.{name}", *argv)


@pytest.fixture(scope="module")
def offline(request, tmp_path_factory) -> dict:
    if shutil.which("git") is None:
        pytest.skip("git is required for the project's commit")
    base = module_dir(request, tmp_path_factory, "offline")
    params = tiny_params()
    params["pseudo"]["enabled"] = False
    proj = make_project(base / "project", params)
    params_text = (proj / "params.yaml").read_text()
    env = guarded_env(base / "guard")
    out = base / "bundles" / "tiny-grid"
    r = subprocess.run([sys.executable, "-m", "tools.offline_run", "--out", str(out), "-S", "ablation.seeds=[3]",
                        "--device", "cpu"], cwd=proj, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=proj, capture_output=True, text=True).stdout.strip()
    return {"project": proj, "out": out, "tar": out.with_name("tiny-grid.tar.gz"), "stdout": r.stdout,
            "guard": base / "guard", "env": env, "params_text": params_text, "commit": commit,
            "manifest": json.loads((out / "manifest.json").read_text())}


def test_the_guard_refuses_mlflow_and_dvc(tmp_path):
    """The finder the offline run is tested under: importing either fails, and the attempt is recorded."""
    env = guarded_env(tmp_path / "guard")
    for name in ("mlflow", "dvc.repo"):
        r = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 1 and "the offline test blocks it" in r.stderr
    assert [ln.split(": ", 1)[1] for ln in (tmp_path / "guard" / "imports.log").read_text().splitlines()] == [
        "import mlflow", "import dvc"]


def test_no_process_of_the_offline_run_imports_mlflow_or_dvc(offline):
    log = offline["guard"] / "imports.log"
    assert not log.exists(), log.read_text()
    seen = (offline["guard"] / "seen.log").read_text()
    for stage in GRID_STAGES:                          # each stage ran (and was asked --help) under the guard
        assert len(re.findall(rf"^\d+ -m stages\.{stage}\b.*: guarded$", seen, re.M)) == 2, stage
    assert re.search(r"^\d+ -m tools\.offline_run\b.*: guarded$", seen, re.M)
    assert len(re.findall(r"^\d+ .*-c from multiprocessing\.spawn.*: guarded$", seen, re.M)) >= 2   # the grid's workers
    proj = offline["project"]
    assert not [n for n in ("mlflow.db", "mlartifacts", "mlruns", "dvc.lock") if (proj / n).exists()]


def test_the_manifest_says_what_ran_where(offline):
    import torch
    m, out = offline["manifest"], offline["out"]
    assert m["format"] == "simformer-offline-bundle/1" and m["status"] == "complete" and m["failed_stage"] is None
    assert m["command"] == "python -m tools.offline_run --out " + str(out) + " -S 'ablation.seeds=[3]' --device cpu"
    assert m["overrides"] == ["ablation.seeds=[3]", "train.device=cpu", "eval.device=cpu"]
    assert m["changed"] == {"ablation.seeds": [[3], [3, 4]], "train.device": ["cpu", "auto"],
                            "eval.device": ["cpu", "auto"]}
    assert m["git"] == {"commit": offline["commit"], "dirty": False, "from": "git"} and len(offline["commit"]) == 40
    assert m["host"] == socket.gethostname()
    mach = m["machine"]
    assert mach["train_device"] == mach["eval_device"] == "cpu" and mach["device_name"] == mach["cpu"] != ""
    assert mach["torch"] == torch.__version__ and mach["python"] == platform.python_version()
    assert mach["torchvision"] == importlib.metadata.version("torchvision")
    assert [s["name"] for s in m["stages"]] == GRID_STAGES          # retrain left out: pseudo.enabled is false
    assert all(s["returncode"] == 0 and s["seconds"] > 0 for s in m["stages"])
    for s in m["stages"]:
        argv = s["command"].split()
        assert argv[:3] == ["python", "-m", f"stages.{s['name']}"] and "--no-progress" in argv
        assert argv[argv.index("--params") + 1] == str(out / "params.yaml")
        # the stages that can log to MLflow were told not to; the others have no such option
        assert ("--no-mlflow" in argv) == (s["name"] in ("train", "evaluate", "ablate", "report")), s["command"]
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    assert re.fullmatch(stamp, m["started_utc"]) and re.fullmatch(stamp, m["finished_utc"])
    assert m["started_utc"] <= m["finished_utc"] and m["wall_seconds"] >= sum(s["seconds"] for s in m["stages"])
    # the effective params: the project's file with the override; the project's file untouched
    assert m["params_text"] == (out / "params.yaml").read_text()
    eff = yaml.safe_load(m["params_text"])
    assert eff["ablation"]["seeds"] == [3] and eff["train"]["iterations"] == 4
    assert (offline["project"] / "params.yaml").read_text() == offline["params_text"]
    assert "trained 4 steps" in (out / "logs" / "train.log").read_text()
    assert "ablation grid: 2 cells" in (out / "logs" / "ablate.log").read_text()


def test_the_bundle_holds_the_cells_and_reports_without_models(offline):
    out, proj, m = offline["out"], offline["project"], offline["manifest"]
    files = sorted(p.relative_to(out / "outputs").as_posix() for p in (out / "outputs").rglob("*") if p.is_file())
    assert files == sorted(m["files"])
    cells = {f"data/ablation/{c}/{f}" for c in CELLS for f in CELL_FILES}
    assert cells <= set(files)
    for name in ("metrics.json", "train_curve.csv", "per_class_iou.csv", "pretrain_curve.csv", "baselines.json",
                 "ablation.md", "ablation.json", "report.md", "figures/variant_curves.png"):
        assert f"reports/{name}" in files, name
    assert not [f for f in files if f.endswith(".pt") or f.startswith(("data/dataset", "data/split", "data/check"))]
    for rel in files:                                  # copies of the stages' outputs, as the manifest lists them
        data = (out / "outputs" / rel).read_bytes()
        assert data == (proj / rel).read_bytes(), rel
        assert m["files"][rel] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    cell = json.loads((out / "outputs/data/ablation/full-3/cell.json").read_text())
    assert cell["shared_with_main"] is True and cell["run_id"] is None
    tar = offline["tar"]
    assert 0 < tar.stat().st_size < 16 * 2 ** 20
    with tarfile.open(tar) as tf:
        members = [t.name for t in tf.getmembers() if t.isfile()]
    assert sorted(n.removeprefix("tiny-grid/outputs/") for n in members if n.startswith("tiny-grid/outputs/")) == files
    assert {f"tiny-grid/{f}" for f in ("manifest.json", "params.yaml", "dvc.yaml", "logs/ablate.log")} <= set(members)


def _store_state(root: Path) -> tuple:
    con = sqlite3.connect(root / "mlflow.db")
    try:
        return tuple(con.execute(q).fetchall() for q in (
            "select run_uuid, name, status, start_time, end_time from runs order by run_uuid",
            "select run_uuid, key, value from tags order by run_uuid, key",
            "select run_uuid, key, step, value from metrics order by run_uuid, key, step",
            "select run_uuid, key, value from params order by run_uuid, key"))
    finally:
        con.close()


def _runs(root: Path) -> dict[str, dict]:
    """name -> {"id", "status", "tags", "metrics" (last value per key), "loss_steps"}."""
    con = sqlite3.connect(root / "mlflow.db")
    try:
        out = {}
        for run_id, name, status in con.execute("select run_uuid, name, status from runs"):
            tags = dict(con.execute("select key, value from tags where run_uuid = ?", (run_id,)).fetchall())
            metrics = dict(con.execute("select key, value from latest_metrics where run_uuid = ?", (run_id,)))
            steps = [s for (s,) in con.execute("select step from metrics where run_uuid = ? and key = 'loss' "
                                               "order by step", (run_id,))]
            out[name] = {"id": run_id, "status": status, "tags": tags, "metrics": metrics, "loss_steps": steps}
        return out
    finally:
        con.close()


def test_import_makes_one_tagged_run_per_cell_and_adds_nothing_the_second_time(offline, store):
    from pipeline.config import params_hash
    from pipeline.offline import Bundle
    from pipeline.tracking import open_tracker

    m, out = offline["manifest"], offline["out"]
    b = Bundle.read(out)
    jobs = {j.key: j for j in b.cell_jobs()}
    assert sorted(jobs) == CELLS and [k for k, j in jobs.items() if j.shared] == ["full-3"]
    # a run already in the store with baseline-3's params (as a run at home would be): never touched
    with open_tracker(jobs["baseline-3"].params, "x", {"stage": "ablate"}, "home-run", root=store) as home:
        home.log_metrics({"mIoU": 1.0})
    before_home = _runs(store)["home-run"]

    assert run_tool("import_runs", offline["tar"]) == 0
    runs = _runs(store)
    assert runs["home-run"] == before_home
    imported = {k: v for k, v in runs.items() if k != "home-run"}
    assert sorted(imported) == ["baseline-seed3@offline", "full-seed3 (main)@offline"]
    digest = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    for name, r in imported.items():
        t = r["tags"]
        assert r["status"] == "FINISHED"
        assert t["source"] == "offline bundle" and t["offline.host"] == m["host"]
        assert t["offline.device"] == f"{m['machine']['device_name']} (cpu)"
        assert t["offline.torch"] == m["machine"]["torch"]
        assert t["git_commit"] == t["offline.commit"] == offline["commit"] and t["offline.manifest_digest"] == digest
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", t["offline.imported_at"])
        assert re.fullmatch(r"[0-9a-f]{64}", t["offline.content_digest"])
        assert t["params_hash"] == "offline-" + t["offline.content_digest"][:16]
        assert t["params_hash"] != before_home["tags"]["params_hash"]
    main = imported["full-seed3 (main)@offline"]
    assert main["tags"]["stage"] == "train" and (main["tags"]["variant"], main["tags"]["seed"]) == ("full", "3")
    assert main["tags"]["offline.params_hash"] == params_hash(b.params)
    assert main["loss_steps"] == [1, 2, 3, 4]
    main_metrics = json.loads((out / "outputs/reports/metrics.json").read_text())
    assert {k: main["metrics"][k] for k in main_metrics if main_metrics[k] is not None} == \
           {k: v for k, v in main_metrics.items() if v is not None}
    for key in CELLS:
        j = jobs[key]
        r = imported[f"{j.variant}-seed{j.seed}{' (main)' if j.shared else ''}@offline"]
        assert (r["tags"]["variant"], r["tags"]["seed"]) == (j.variant, str(j.seed))
        cell = json.loads((j.out / "cell.json").read_text())
        expected = {**json.loads((j.out / "metrics.json").read_text()), **cell["heldout"]}
        assert {k: r["metrics"][k] for k in expected if expected[k] is not None} == \
               {k: v for k, v in expected.items() if v is not None}, key
        if not j.shared:
            assert r["tags"]["executor"] == "offline" and r["loss_steps"] == [1, 2, 3, 4]
            assert r["tags"]["offline.params_hash"] == cell["params_hash"] == params_hash(j.params)
    assert json.loads((out / "outputs/data/ablation/baseline-3/cell.json").read_text())["run_id"] is None

    state = _store_state(store)
    assert run_tool("import_runs", out) == 0           # the folder this time: the same bundle
    assert _store_state(store) == state


def test_import_writes_the_bundle_report_with_its_provenance(offline, tmp_path):
    out, m = offline["out"], offline["manifest"]
    dest = tmp_path / "reports" / "offline" / "tiny-grid"
    assert run_tool("import_runs", offline["tar"], "--no-mlflow", "--report-out", dest) == 0
    names = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert {"README.md", "report.md", "ablation.md", "ablation.json", "figures/variant_curves.png"} <= set(names)
    # the same cells as the report stage read offline: the same summary
    assert json.loads((dest / "ablation.json").read_text()) == \
           json.loads((out / "outputs/reports/ablation.json").read_text())
    readme = (dest / "README.md").read_text()
    assert readme.startswith("# Offline run: tiny-grid\n")
    assert f"`{offline['commit']}`" in readme and m["machine"]["device_name"] in readme and m["host"] in readme
    assert f"{m['started_utc']} to {m['finished_utc']}" in readme and "`ablation.seeds` [3] (was [3, 4])" in readme
    report = (dest / "report.md").read_text()
    assert offline["commit"] in report and "simformer-bundle-" not in report + readme   # no temporary path
    assert run_tool("import_runs", out, "--no-mlflow", "--report-out", dest) == 0       # its own folder: replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert run_tool("import_runs", out, "--no-mlflow", "--report-out", other) == 1
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("flag, named", [
    ("loss.pp_wieght=0.5", "unknown params key 'loss.pp_wieght'. Did you mean 'loss.pp_weight'?"),
    ("ablation.sedes=[6,7]", "unknown params key 'ablation.sedes'"),
    ("loss.pp_weight.x=1", "params key 'loss.pp_weight' is a value, not a group"),
    ("train.iterations=-3", "params key 'train.iterations': -3 is out of range"),
])
def test_a_bad_override_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys, flag, named):
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, proj / name)
    monkeypatch.chdir(proj)
    assert run_tool("offline_run", "--out", tmp_path / "bundle", "-S", flag) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and f"-S {flag}" in err, err
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "bundle.tar.gz").exists()
    assert sorted(p.name for p in proj.iterdir()) == ["dvc.yaml", "params.yaml"]
    assert (proj / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()


def test_import_names_a_missing_or_foreign_bundle(tmp_path, capsys):
    assert run_tool("import_runs", tmp_path / "nope" / "grid.tar.gz") == 1
    assert f"bundle '{tmp_path / 'nope' / 'grid.tar.gz'}' does not exist" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    assert run_tool("import_runs", tmp_path / "folder", "--no-mlflow", "--report-out", tmp_path / "r") == 1
    assert f"'{tmp_path / 'folder'}' is not an offline bundle: it has no manifest.json" in capsys.readouterr().err


def test_overrides_and_the_default_stages():
    from pipeline.offline import apply_overrides, default_stages, read_pipeline
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    new = apply_overrides(raw, ["ablation.seeds=[6,7]", "params.yaml:loss.pp_weight=0.5", "data.url=",
                                "+ablation.variants.pp2={loss: {pp_weight: 2.0}}", "loss.pp_weight=0.25"])
    assert new["ablation"]["seeds"] == [6, 7] and new["loss"]["pp_weight"] == 0.25 and new["data"]["url"] == ""
    assert new["ablation"]["variants"]["pp2"] == {"loss": {"pp_weight": 2.0}}
    assert raw["loss"]["pp_weight"] == 0.3                     # the mapping given is not changed
    stages = read_pipeline(ROOT / "dvc.yaml")
    assert default_stages(stages, pseudo=False) == GRID_STAGES
    assert default_stages(stages, pseudo=True) == GRID_STAGES[:6] + ["retrain"] + GRID_STAGES[6:]
    assert list(stages) == GRID_STAGES[:6] + ["retrain"] + GRID_STAGES[6:]


def test_the_archive_holds_the_folder_and_a_bundle_over_the_limit_is_refused(tmp_path):
    import os

    from pipeline.offline import check_size, pack
    folder = tmp_path / "grid"
    (folder / "outputs").mkdir(parents=True)
    (folder / "outputs" / "big.bin").write_bytes(os.urandom(3 * 2 ** 20))        # incompressible
    (folder / "manifest.json").write_text("{}")
    (folder / ".manifest.json.x.tmp").write_text("")                              # a writer's temporary
    size = pack(folder, folder / "bundle.tar.gz")                                 # the archive inside its folder
    with tarfile.open(folder / "bundle.tar.gz") as tf:
        assert sorted(tf.getnames()) == ["grid", "grid/manifest.json", "grid/outputs", "grid/outputs/big.bin"]
    assert size == (folder / "bundle.tar.gz").stat().st_size > 3 * 2 ** 20
    files = {"outputs/big.bin": {"bytes": 3 * 2 ** 20}, "reports/metrics.json": {"bytes": 200}}
    check_size(folder / "bundle.tar.gz", 4, files, folder, False)
    with pytest.raises(ValueError, match=r"bundle\.tar\.gz is 3\.0 MiB, over the 2 MiB limit; its largest files: "
                                         r"outputs/big\.bin \(3\.0 MiB\), reports/metrics\.json \(0\.0 MiB\) "
                                         r"\(leave out --keep-models\)\. The folder .*grid holds it all"):
        check_size(folder / "bundle.tar.gz", 2, files, folder, True)


def test_a_failed_stage_leaves_a_bundle_of_what_ran_that_import_refuses(tmp_path, monkeypatch, capsys):
    """prepare without the download stage's output fails: the run stops there, naming it; the bundle
    holds the manifest (status failed) and the stage's log."""
    proj = tmp_path / "proj"
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, proj / name)
    monkeypatch.chdir(proj)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "bundle"
    assert run_tool("offline_run", "--out", out, "--stages", "prepare", "--device", "cpu") == 1
    err = capsys.readouterr().err
    assert f"error: stage 'prepare' failed (exit 1): its output is in {out / 'logs' / 'prepare.log'}" in err
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "failed" and m["failed_stage"] == "prepare" and m["files"] == {}
    assert [(s["name"], s["returncode"]) for s in m["stages"]] == [("prepare", 1)]
    assert "data/dataset" in (out / "logs" / "prepare.log").read_text()
    assert m["git"]["commit"] == "unknown" and m["git"]["dirty"] is None     # a copied tree without .git
    assert (tmp_path / "bundle.tar.gz").is_file()
    assert run_tool("import_runs", tmp_path / "bundle.tar.gz", "--no-mlflow", "--report-out", tmp_path / "r") == 1
    assert "is not complete (status 'failed', stage 'prepare' failed): nothing is imported" in capsys.readouterr().err
