"""Plain helpers shared by the test modules: params, tiny DVC projects, in-process stage runs,
MLflow store queries and tiny dataset archives in the official layouts. Fixtures live in
``tests/conftest.py``; this is not a test module, so test modules import from it."""
from __future__ import annotations

import copy
import hashlib
import importlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import scipy.io
import yaml

ROOT = Path(__file__).resolve().parents[1]


# ============================================================================ params


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def file_params(overrides: dict | None = None) -> dict:
    """The params file's mapping (params.yaml sets every key: it is the only place a value
    lives) with ``overrides`` merged in, e.g. ``{"train": {"lr": 1e-3}}``."""
    return _merged(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides or {})


def merge(base: dict, over: dict) -> dict:
    """A deep copy of ``base`` with ``over`` merged in, group by group."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


TINY = {
    "base": {"seed": 3},
    "data": {"crop_size": 64, "synthetic": {"num_train": 16, "num_test": 4, "image_size": 64},
             "prepare_workers": 1},
    "model": {"hidden_dim": 32, "num_queries": 8, "nheads": 2, "dec_layers": 2, "dim_feedforward": 64,
              "conv_dim": 32, "mask_dim": 32, "gn_groups": 8},
    "loss": {"sim_points": 10, "sim_base_points": 8, "pp_points": 10},
    "train": {"iterations": 4, "batch_size": 4, "checkpoint_interval": 2, "log_interval": 1, "threads": 1,
              "diagnostics_interval": 2},
    "pretrain": {"iterations": 3, "batch_size": 4},
    "pseudo": {"enabled": True, "iterations": 2},
}
# Two variants x two seeds; iterations 0 = train.iterations, so full-3 is the main training. Two
# workers: the three cells that train run two at a time, in spawned processes (train.threads 1).
TINY_ABLATION = {"seeds": [3, 4], "splits": [], "iterations": 0, "workers": 2, "run": ["baseline", "full"],
                 "variants": {"baseline": {"loss": {"comp_weight": 0.0, "sim_weight": 0.0, "pp_weight": 0.0}},
                              "full": {}}}


def tiny_params() -> dict:
    """params.yaml with the e2e pipeline's tiny config (64 px, 16 train images, tiny model, 2x2 grid)."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    for group, values in TINY.items():
        for k, v in values.items():
            if isinstance(v, dict):
                p[group][k].update(v)
            else:
                p[group][k] = v
    p["ablation"] = {**TINY_ABLATION, "executor": "local", "slurm": p["ablation"]["slurm"]}
    return p


def small_params(**groups) -> dict:
    """The e2e TINY params (64 px, 16 train images, tiny model), 4 steps, checkpoint every 2;
    ``groups`` are merged in (``train={"iterations": 6}``)."""
    p = tiny_params()
    p["pseudo"]["enabled"] = False
    p["model"]["pretrained"] = "none"       # the loop's own tests; the e2e test drives the pretrain stage
    p["train"]["freeze"] = "none"            # every part trains (the paper's regime)
    p["train"]["warmup"] = 0                 # the paper schedule: 4-step runs would barely move
    p["train"]["diagnostics_interval"] = 0   # the e2e test drives the diagnostics; here they would add criterion calls
    p["data"].update({"scale_min": 0.5, "scale_max": 1.5})   # whole 64 px images fit a crop: novel pairs each step
    p["train"].update({"iterations": 4, "checkpoint_interval": 2, "log_interval": 1, "threads": 1,
                       "device": "cpu"})
    p["eval"]["device"] = "cpu"
    for g, values in groups.items():
        p[g].update(values)
    return p


def write_params(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ============================================================================ DVC projects


def make_project(dst: Path, params: dict) -> Path:
    """A git repository at ``dst`` with the project's code, dvc.yaml and ``params``."""
    for name in ("pipeline", "stages", "tools"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, dst / name)
    (dst / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", dst / ".dvc" / "config")
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dst, check=True, env=env)
    return dst


def project_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update({"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@localhost", "OMP_NUM_THREADS": "1"})
    env.pop("DVC_ROOT", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    dvc_bin = Path(sys.executable).parent / "dvc"
    r = subprocess.run([str(dvc_bin), *args], cwd=project, env=project_env(), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r


# ============================================================================ MLflow store queries


def mlflow_runs(project: Path) -> list[tuple]:
    con = sqlite3.connect(project / "mlflow.db")
    try:
        return con.execute(
            "select r.run_uuid, r.status, e.name from runs r join experiments e on r.experiment_id = e.experiment_id "
            "where r.lifecycle_stage = 'active'").fetchall()
    finally:
        con.close()


def run_tags(project: Path) -> dict[str, dict[str, str]]:
    """run id -> tags, for runs not deleted."""
    con = sqlite3.connect(project / "mlflow.db")
    try:
        rows = con.execute("select t.run_uuid, t.key, t.value from tags t join runs r on r.run_uuid = t.run_uuid "
                           "where r.lifecycle_stage = 'active'").fetchall()
    finally:
        con.close()
    out: dict[str, dict[str, str]] = {}
    for run_id, k, v in rows:
        out.setdefault(run_id, {})[k] = v
    return out


def metric_keys(project: Path, run_id: str) -> set[str]:
    con = sqlite3.connect(project / "mlflow.db")
    try:
        return {r[0] for r in con.execute("select distinct key from metrics where run_uuid = ?", (run_id,))}
    finally:
        con.close()


def run_info(project: Path) -> dict[str, tuple]:
    """run id -> (status, start_time, end_time, name)."""
    con = sqlite3.connect(project / "mlflow.db")
    try:
        return {r[0]: r[1:] for r in con.execute("select run_uuid, status, start_time, end_time, name from runs "
                                                 "where lifecycle_stage = 'active'")}
    finally:
        con.close()


def runs_in_store(root: Path) -> list[dict]:
    """Every run of the store at ``root``: id, status, tags and the steps its loss was logged at."""
    con = sqlite3.connect(root / "mlflow.db")
    try:
        rows = con.execute("select run_uuid, status from runs").fetchall()
        out = []
        for run_id, status in rows:
            tags = dict(con.execute("select key, value from tags where run_uuid = ?", (run_id,)).fetchall())
            steps = sorted({s for (s,) in con.execute(
                "select step from metrics where run_uuid = ? and key = 'loss'", (run_id,))})
            out.append({"run_id": run_id, "status": status, "tags": tags, "loss_steps": steps})
        return out
    finally:
        con.close()


# ============================================================================ stages in-process


def run_stage(name: str, *argv) -> int:
    """``python -m stages.<name> argv...`` in-process: the exit status (0 when main returns)."""
    return run_module(f"stages.{name}", *argv)


def run_module(module: str, *argv) -> int:
    """``python -m <module> argv...`` (a stage or a tool) in-process: the exit status (0 when its main
    returns)."""
    from pipeline.cli import run
    mod = importlib.import_module(module)
    old = sys.argv
    sys.argv = [module.replace(".", "/") + ".py", *map(str, argv)]
    try:
        run(mod.main)
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old


def train_argv(out: Path, data: Path, params: Path) -> list:
    """The train stage's arguments: data from ``data`` (dataset/, split/), outputs under ``out``."""
    return ["--params", params, "--dataset-dir", data / "dataset", "--split-dir", data / "split",
            "--model", out / "data/train/model.pt", "--checkpoint", out / "data/checkpoints/train.pt",
            "--curve", out / "reports/train_curve.csv", "--no-progress"]


def step_batch(data: Path, step: int, params: dict) -> list[int]:
    """Training-image indices the sampler draws at ``step`` (0-based), as ``train`` does."""
    from pipeline.data.sampler import PairBatchSampler
    index = json.loads((data / "split/index.json").read_text())
    usable = [i for i, e in enumerate(index["train"]) if e["usable"]]
    return list(PairBatchSampler(index["class_to_images"], usable, params["train"]["batch_size"],
                                 params["base"]["seed"]).batch(step))


# ============================================================================ files


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    """Names in ``folder`` other than ``keep`` (temporary files a failed write left behind)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def md5_checksum(path) -> str:
    """``md5:<hex>`` of a file, as ``data.checksum`` takes it."""
    return "md5:" + hashlib.md5(Path(path).read_bytes()).hexdigest()


# ============================================================================ tiny official archives
#
# ADEChallengeData2016.zip: ``ADEChallengeData2016/images/{training,validation}/*.jpg``,
# ``ADEChallengeData2016/annotations/{training,validation}/*.png`` (values 0..150),
# ``objectInfo150.txt``. cocostuff-10k-v1.1.zip: ``images/*.jpg``, ``annotations/*.mat``
# (MATLAB v5, key ``S``), ``imageLists/{train,test}.txt``.


def jpg_bytes(h, w, seed):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def png_bytes(arr):
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def coco_mat_bytes(S):
    """A COCO-Stuff label file: MATLAB v5 with the label map ``S`` and a ``names`` cell."""
    bio = io.BytesIO()
    scipy.io.savemat(bio, {"S": S, "names": np.array(["unlabeled", "person"], dtype=object)})
    return bio.getvalue()


ADE_TRAIN_1 = np.array([[0, 1, 150, 2],
                        [1, 1, 0, 150],
                        [75, 76, 149, 0]], np.uint8)
ADE_TRAIN_1_EXPECTED = np.array([[255, 0, 149, 1],
                                 [0, 0, 255, 149],
                                 [74, 75, 148, 255]], np.uint8)


def make_ade_zip(path, *, mismatch=False):
    lab2 = np.zeros((5, 7), np.uint8)  # all "other": prepared label all 255, kept here
    val = np.full((4, 4), 3, np.uint8)
    val[0, 0] = 0
    members = {
        "ADEChallengeData2016/objectInfo150.txt": b"Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n",
        "ADEChallengeData2016/sceneCategories.txt": b"ADE_train_00000001 airport_terminal\n",
        "ADEChallengeData2016/images/training/ADE_train_00000001.jpg": jpg_bytes(3, 4, 1),
        "ADEChallengeData2016/images/training/ADE_train_00000002.jpg": jpg_bytes(5, 7, 2),
        "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg": jpg_bytes(6 if mismatch else 4, 4, 3),
        "ADEChallengeData2016/annotations/training/ADE_train_00000001.png": png_bytes(ADE_TRAIN_1),
        "ADEChallengeData2016/annotations/training/ADE_train_00000002.png": png_bytes(lab2),
        "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png": png_bytes(val),
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for d in ("ADEChallengeData2016/", "ADEChallengeData2016/images/", "ADEChallengeData2016/annotations/"):
            zf.writestr(d, b"")
        for name, data in members.items():
            zf.writestr(name, data)
    return Path(path)


COCO_TRAIN = ["COCO_train2014_000000000077", "COCO_train2014_000000016680"]
COCO_TEST = ["COCO_train2014_000000000321"]


# coco ids: 0 unlabeled, 1 person, 2 bicycle, 92 banner (first stuff), 182 wood (last), 12 (not in table)
COCO_S1 = np.array([[0, 1, 2, 92],
                    [182, 182, 1, 0],
                    [12, 92, 0, 2]], np.uint16)
COCO_S1_EXPECTED = np.array([[255, 0, 1, 80],
                             [170, 170, 0, 255],
                             [255, 80, 255, 1]], np.uint8)


def make_coco_zip(path, *, mismatch=False):
    S2 = np.full((4, 5), 92, np.uint8)  # uint8 label maps occur too
    S3 = np.array([[1, 0], [182, 93], [0, 0]], np.uint16)
    members = {
        "cocostuff-10k-v1.1.json": b"{}",
        "imageLists/train.txt": ("\n".join(COCO_TRAIN) + "\n").encode(),
        "imageLists/test.txt": ("\n".join(COCO_TEST) + "\n").encode(),
        "imageLists/all.txt": ("\n".join(COCO_TRAIN + COCO_TEST) + "\n").encode(),
        f"images/{COCO_TRAIN[0]}.jpg": jpg_bytes(3, 4, 4),
        f"images/{COCO_TRAIN[1]}.jpg": jpg_bytes(4, 5, 5),
        f"images/{COCO_TEST[0]}.jpg": jpg_bytes(3, 3 if mismatch else 2, 6),
        f"annotations/{COCO_TRAIN[0]}.mat": coco_mat_bytes(COCO_S1),
        f"annotations/{COCO_TRAIN[1]}.mat": coco_mat_bytes(S2),
        f"annotations/{COCO_TEST[0]}.mat": coco_mat_bytes(S3),
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return Path(path)
