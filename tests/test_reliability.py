"""Reliability: atomic outputs, non-finite losses, params validation, bad data, security, and
the MLflow trouble policy (pipeline/tracking.py), each exercised by injecting the fault.

Stages are run in-process through ``pipeline.cli.run`` (the same wrapper ``python -m
stages.<name>`` uses) so that exit codes and messages are the real ones without paying a
Python start-up per test. The SIGKILL/resume test lives in tests/test_resume.py.
"""
from __future__ import annotations

import ast
import copy
import hashlib
import importlib
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from tests.conftest import ROOT
from tests.test_pipeline_e2e import tiny_params

# ============================================================================ shared helpers


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


def _once(request, key: str, make):
    """Build once per test session, also across test_resume (which imports these fixtures, and
    with them a second copy of this module)."""
    cache = request.session.__dict__.setdefault("_reliability_fixtures", {})
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _make_tiny_data(root: Path) -> Path:
    from pipeline.config import build_params
    from pipeline.data.splits import build_split, write_split
    from pipeline.data.synthetic import generate_dataset
    p = build_params(small_params())
    generate_dataset(root / "dataset", p.data.synthetic, p.base.seed, progress=False)
    split, index = build_split(root / "dataset", "synthetic", 1, progress=False)
    write_split(root / "split", split, index)
    return root


def _make_mlflow_template(root: Path) -> Path:
    from pipeline import tracking
    tracking.open_client(root).search_experiments()
    return root / "mlflow.db"


@pytest.fixture(scope="session")
def tiny_data(request, tmp_path_factory) -> Path:
    """``dataset/`` and ``split/`` built by the functions the download and prepare stages call
    (read-only: tests that damage data copy it first)."""
    return _once(request, "tiny_data", lambda: _make_tiny_data(tmp_path_factory.mktemp("tiny_data")))


@pytest.fixture(scope="session")
def mlflow_template(request, tmp_path_factory) -> Path:
    """An initialised (migrated) empty store, copied per test: creating one costs seconds."""
    pytest.importorskip("mlflow")
    return _once(request, "mlflow", lambda: _make_mlflow_template(tmp_path_factory.mktemp("mlflow_template")))


@pytest.fixture
def store(tmp_path, mlflow_template, monkeypatch) -> Path:
    """A fresh MLflow store root for this test, found by the stages through $DVC_ROOT."""
    root = tmp_path / "store"
    root.mkdir()
    shutil.copy(mlflow_template, root / "mlflow.db")
    monkeypatch.setenv("DVC_ROOT", str(root))
    return root


def run_stage(name: str, *argv) -> int:
    """``python -m stages.<name> argv...`` in-process: the exit status (0 when main returns)."""
    from pipeline.cli import run
    mod = importlib.import_module(f"stages.{name}")
    old = sys.argv
    sys.argv = [f"stages/{name}.py", *map(str, argv)]
    try:
        run(mod.main)
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old


def train_argv(out: Path, data: Path, params: Path) -> list:
    return ["--params", params, "--dataset-dir", data / "dataset", "--split-dir", data / "split",
            "--model", out / "data/train/model.pt", "--checkpoint", out / "data/checkpoints/train.pt",
            "--curve", out / "reports/train_curve.csv", "--no-progress"]


def runs_in_store(root: Path) -> list[dict]:
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


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def step_batch(data: Path, step: int, params: dict) -> list[int]:
    """Training-image indices the sampler draws at ``step`` (0-based), as ``train`` does."""
    from pipeline.data.sampler import PairBatchSampler
    index = json.loads((data / "split/index.json").read_text())
    usable = [i for i, e in enumerate(index["train"]) if e["usable"]]
    return list(PairBatchSampler(index["class_to_images"], usable, params["train"]["batch_size"],
                                 params["base"]["seed"]).batch(step))


# ============================================================================ 2. atomic outputs


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_atomic_path_crash_mid_write_keeps_previous_file(tmp_path):
    from pipeline.io import atomic_path, write_json
    target = tmp_path / "reports" / "metrics.json"
    write_json(target, {"mIoU": 1.0})
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b'{"mIoU": 2.0, "par')           # half a file, then the writer dies
            raise RuntimeError("disk full")
    assert target.read_bytes() == before
    assert _leftovers(target.parent, {"metrics.json"}) == []


def test_write_json_failing_at_fsync_keeps_previous_file(tmp_path, monkeypatch):
    import pipeline.io as io
    target = tmp_path / "metrics.json"
    io.write_json(target, {"v": 1})
    before = target.read_bytes()

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        io.write_json(target, {"v": 2, "pad": "x" * 100_000})
    assert target.read_bytes() == before
    assert _leftovers(tmp_path, {"metrics.json"}) == []


def test_checkpoint_writer_crash_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from pipeline.engine import checkpoint as ck
    path = tmp_path / "checkpoints" / "train.pt"
    ck.save_checkpoint(path, {"step": 2, "w": torch.ones(3)})
    before = path.read_bytes()
    real_save = torch.save

    def dies_half_way(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:                     # the new file is half written ...
            fh.truncate(Path(f).stat().st_size // 2)
        raise OSError(5, "Input/output error")        # ... when the write fails

    monkeypatch.setattr(ck.torch, "save", dies_half_way)
    with pytest.raises(OSError, match="Input/output error"):
        ck.save_checkpoint(path, {"step": 4, "w": torch.zeros(3)})
    assert path.read_bytes() == before
    assert ck.load_checkpoint(path)["step"] == 2
    assert _leftovers(path.parent, {"train.pt"}) == []


def test_atomic_dir_crash_keeps_previous_folder(tmp_path):
    from pipeline.io import atomic_dir
    target = tmp_path / "data" / "split"
    with atomic_dir(target) as tmp:
        (tmp / "split.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "split.json").write_text("new")
            (tmp / "index.json").write_text("{")
            raise KeyboardInterrupt
    assert files_under(target) == ["split.json"] and (target / "split.json").read_text() == "old"
    assert _leftovers(target.parent, {"split"}) == []


def test_atomic_dir_failed_swap_restores_previous_folder(tmp_path, monkeypatch):
    """The swap is two renames (old aside, new in); if the second fails the old folder must be
    back at its name, not left hidden as ``.<name>.old``."""
    import pipeline.io as io
    target = tmp_path / "dataset"
    target.mkdir()
    (target / "classes.json").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.endswith(".tmp") and Path(dst) == target:
            raise OSError(18, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(OSError, match="cross-device"):
        with io.atomic_dir(target) as tmp:
            (tmp / "classes.json").write_text("new")
    assert (target / "classes.json").read_text() == "old"
    assert _leftovers(tmp_path, {"dataset"}) == []


def test_generator_crash_keeps_previous_dataset(tmp_path, monkeypatch):
    """A real writer (the synthetic generator) failing on its 7th image: the dataset built by
    an earlier run is untouched, and no temporary folder is left."""
    from pipeline.config import SyntheticConfig
    from pipeline.data import synthetic
    out = tmp_path / "dataset"
    cfg = SyntheticConfig(num_train=4, num_test=2, image_size=32, jitter=1.0, cooccur=0.0)
    synthetic.generate_dataset(out, cfg, 1, progress=False)
    before = {f: sha(out / f) for f in files_under(out) if (out / f).is_file()}
    real = cv2.imwrite
    calls = {"n": 0}

    def imwrite(path, *a, **k):
        calls["n"] += 1
        return False if calls["n"] == 7 else real(path, *a, **k)

    monkeypatch.setattr(synthetic.cv2, "imwrite", imwrite)
    with pytest.raises(OSError, match=r"could not write .*\.(jpg|png)"):
        synthetic.generate_dataset(out, cfg, 2, progress=False)
    assert {f: sha(out / f) for f in files_under(out) if (out / f).is_file()} == before
    assert _leftovers(tmp_path, {"dataset"}) == []


# ---------------------------------------------------------------- writes go through pipeline.io

# call -> where its destination is: ("arg", i) or ("receiver",)
_DEST = {
    "torch.save": ("arg", 1), "np.save": ("arg", 0), "numpy.save": ("arg", 0), "np.savez": ("arg", 0),
    "np.savez_compressed": ("arg", 0), "cv2.imwrite": ("arg", 0), "shutil.copy": ("arg", 1),
    "shutil.copy2": ("arg", 1), "shutil.copyfile": ("arg", 1), "shutil.copytree": ("arg", 1),
}
_DEST_ATTR = {"savefig": ("arg", 0), "to_csv": ("arg", 0), "to_json": ("arg", 0), "to_parquet": ("arg", 0),
              "to_pickle": ("arg", 0), "write_text": ("receiver",), "write_bytes": ("receiver",)}
_ATOMIC = {"atomic_path", "atomic_dir"}

# (file, enclosing function, call) -> why a write outside an atomic_* block is fine there.
# Every entry must still match a write (a stale entry fails the test).
WRITE_ALLOWLIST = {
    ("pipeline/data/prepare.py", "_convert_one", "cv2.imwrite"):
        "writes into the atomic_dir temporary folder that prepare_dataset passes in (worker process)",
    ("pipeline/data/prepare.py", "_convert_one", "shutil.copyfile"):
        "copies into the atomic_dir temporary folder that prepare_dataset passes in (worker process)",
    ("pipeline/data/download.py", "_fetch_once", "open"):
        "the resumable '<archive>.part' file; download() renames it onto the archive after the checksum",
    ("pipeline/tracking.py", "_init_lock", "open"): "an flock lock file, not an output",
    ("pipeline/jobs.py", "__enter__", "open"): "an flock lock file marking a running training, not an output",
    ("pipeline/engine/benchmark.py", "measure_training", ".write_text"):
        "resets the kernel's peak-RSS counter (/proc/self/clear_refs), not an output",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _names(node: ast.AST | None) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} if node is not None else set()


def _write_target(call: ast.Call):
    """(call name, destination expression) when ``call`` writes a file, else None."""
    func, name = call.func, _dotted(call.func)
    where = _DEST.get(name)
    if where is None and isinstance(func, ast.Attribute) and func.attr in _DEST_ATTR:
        where, name = _DEST_ATTR[func.attr], "." + func.attr
    if name in ("open", "io.open") or (isinstance(func, ast.Attribute) and func.attr == "open"):
        builtin = name in ("open", "io.open")
        mode = next((k.value for k in call.keywords if k.arg == "mode"), None)
        pos = 1 if builtin else 0
        if mode is None and len(call.args) > pos:
            mode = call.args[pos]
        if isinstance(mode, ast.Constant) and isinstance(mode.value, str):
            if not set(mode.value) & set("wax+"):
                return None
        elif mode is None or not builtin:           # default "r"; zf.open(info) & co. read
            return None
        where, name = (("arg", 0) if builtin else ("receiver",)), "open"
    if where is None:
        return None
    if where[0] == "receiver":
        return name, func.value
    if len(call.args) <= where[1]:
        return None if name.startswith(".to_") else (name, None)   # df.to_csv() returns a string
    return name, call.args[where[1]]


def scan_writes(source: str, filename: str = "<src>") -> list[dict]:
    """Every file write in ``source``, with whether its destination is the temporary path of an
    enclosing ``with atomic_path(...)/atomic_dir(...) as tmp`` (or a name derived from it)."""
    tree = ast.parse(source, filename)
    found: list[dict] = []

    def derive(body: list[ast.stmt], tainted: set[str]) -> set[str]:
        tainted = set(tainted)
        while True:
            grown = set(tainted)
            for stmt in body:
                for n in ast.walk(stmt):
                    if isinstance(n, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and _names(n.value) & grown:
                        targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                        for t in targets:
                            grown |= _names(t)
                    elif isinstance(n, (ast.For, ast.comprehension)) and _names(n.iter) & grown:
                        grown |= _names(n.target)
                    elif isinstance(n, ast.withitem) and _names(n.context_expr) & grown:
                        grown |= _names(n.optional_vars)       # with open(tmp, "wb") as f
            if grown == tainted:
                return tainted
            tainted = grown

    def visit(node: ast.AST, func: str, tainted: frozenset[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func = node.name if func == "<module>" else f"{func}.{node.name}"
        if isinstance(node, (ast.With, ast.AsyncWith)):
            new = {_dotted(i.optional_vars) for i in node.items
                   if isinstance(i.context_expr, ast.Call) and _dotted(i.context_expr.func).split(".")[-1] in _ATOMIC
                   and isinstance(i.optional_vars, ast.Name)}
            if new:
                inner = frozenset(derive(node.body, tainted | new))
                for i in node.items:
                    visit(i, func, tainted)
                for stmt in node.body:
                    visit(stmt, func, inner)
                return
        if isinstance(node, ast.Call):
            hit = _write_target(node)
            if hit is not None:
                name, dest = hit
                found.append({"file": filename, "line": node.lineno, "func": func.split(".")[0], "call": name,
                              "atomic": bool(dest is not None and _names(dest) & tainted)})
        for child in ast.iter_child_nodes(node):
            visit(child, func, tainted)

    visit(tree, "<module>", frozenset())
    return found


def test_write_scanner_catches_bare_writes():
    src = textwrap.dedent('''
        def bad(p, model, img, df, fig):
            with open(p, "w") as f:
                f.write("x")
            Path(p).write_text("x")
            torch.save(model, p)
            cv2.imwrite(str(p), img)
            df.to_csv(p)
            with atomic_path(p) as tmp:
                torch.save(model, p)          # inside the block, but to the final path
            with open(p, mode="ab") as f:
                pass

        def good(p, d, model, img, df, fig):
            with atomic_path(p) as tmp:
                torch.save(model, tmp)
                with open(tmp, "wb") as f:
                    f.write(b"")
            with atomic_dir(d) as tmp:
                sub = tmp / "images" / "train"
                for x in [sub]:
                    cv2.imwrite(str(x / "a.png"), img)
                def nested(name):
                    cv2.imwrite(str(sub / name), img)
            with atomic_path(p, suffix=".png") as tmp:
                fig.savefig(tmp, format="png")
            text = df.to_csv()
            with open(p) as f, open(p, "rb") as g, zf.open(info) as h:
                pass
    ''')
    hits = scan_writes(src)
    bad = [(h["func"], h["call"]) for h in hits if not h["atomic"]]
    assert bad == [("bad", "open"), ("bad", ".write_text"), ("bad", "torch.save"), ("bad", "cv2.imwrite"),
                   ("bad", ".to_csv"), ("bad", "torch.save"), ("bad", "open")]
    assert sum(h["atomic"] for h in hits) == 5 and all(h["func"] == "good" for h in hits if h["atomic"])


def test_stages_and_pipeline_write_outputs_atomically():
    files = sorted((ROOT / "stages").glob("*.py")) + sorted((ROOT / "pipeline").rglob("*.py"))
    files = [f for f in files if f != ROOT / "pipeline" / "io.py"]
    hits = []
    for f in files:
        hits += scan_writes(f.read_text(), str(f.relative_to(ROOT)))
    assert sum(h["atomic"] for h in hits) >= 8          # the scanner sees the real write sites
    used = set()
    offenders = []
    for h in hits:
        if h["atomic"]:
            continue
        key = (h["file"], h["func"], h["call"])
        if key in WRITE_ALLOWLIST:
            used.add(key)
        else:
            offenders.append(f"{h['file']}:{h['line']} {h['call']} in {h['func']}()")
    assert not offenders, ("writes outside pipeline.io helpers / atomic_path / atomic_dir (a crash leaves a "
                           "half-written output):\n" + "\n".join(offenders))
    assert set(WRITE_ALLOWLIST) == used, f"stale allow-list entries: {set(WRITE_ALLOWLIST) - used}"


# ============================================================================ 3. non-finite loss


def _criterion_fault(monkeypatch, at_call: int, how: str):
    """Make ``train``'s criterion misbehave on its ``at_call``-th call (1-based = curve step)."""
    import pipeline.engine.train as T
    real = T.build_criterion
    calls = {"n": 0}

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    def build(*a, **k):
        crit = real(*a, **k)
        forward = crit.forward

        def faulty(*fa, **fk):
            losses = forward(*fa, **fk)
            calls["n"] += 1
            if calls["n"] == at_call:
                if how == "nan_loss":
                    losses["loss_ce"] = losses["loss_ce"] * float("nan")
                else:                                   # finite loss, non-finite gradients
                    losses["loss_ce"] = NanGrad.apply(losses["loss_ce"])
            return losses

        crit.forward = faulty
        return crit

    monkeypatch.setattr(T, "build_criterion", build)


def _record_checkpoints(monkeypatch) -> list[bytes]:
    import pipeline.engine.checkpoint as C           # TrainState.save writes through it
    real, saved = C.save_checkpoint, []

    def save(path, state):
        real(path, state)
        saved.append(Path(path).read_bytes())

    monkeypatch.setattr(C, "save_checkpoint", save)
    return saved


def test_nonfinite_loss_stops_stage_keeps_last_checkpoint(tmp_path, tiny_data, store, monkeypatch, capsys):
    params = write_params(tmp_path / "params.yaml", small_params(train={"iterations": 6}))
    _criterion_fault(monkeypatch, at_call=3, how="nan_loss")
    saved = _record_checkpoints(monkeypatch)
    out = tmp_path / "out"
    code = run_stage("train", *train_argv(out, tiny_data, params))
    err = capsys.readouterr().err
    assert code == 1
    assert re.search(r"non-finite loss at step 3\b.*loss_ce", err), err
    ckpt = out / "data/checkpoints/train.pt"
    assert str(ckpt) in err
    assert len(saved) == 1 and ckpt.read_bytes() == saved[0]       # the step-2 checkpoint, unchanged
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    assert files_under(out) == ["data", "data/checkpoints", "data/checkpoints/train.pt"]  # no model, no curve
    (run,) = runs_in_store(store)
    assert run["status"] == "FAILED" and run["loss_steps"] == [1, 2]


@pytest.mark.parametrize("at_step, message", [
    (4, r"non-finite weights after step 4\b"),      # poisoned on a checkpoint step: not written
    (3, r"non-finite weights at step 4\b"),         # poisoned in between: the next step says why
])
def test_nonfinite_gradients_are_never_checkpointed(at_step, message, tmp_path, tiny_data, monkeypatch):
    """A finite loss whose gradients are NaN poisons the weights: the error names the step, and
    the checkpoint due at that step must not overwrite the last good one."""
    from pipeline.config import build_params
    from pipeline.engine.train import NonFiniteLossError, train
    p = build_params(small_params(train={"iterations": 6}))
    split = json.loads((tiny_data / "split/split.json").read_text())
    index = json.loads((tiny_data / "split/index.json").read_text())
    _criterion_fault(monkeypatch, at_call=at_step, how="nan_grad")
    saved = _record_checkpoints(monkeypatch)
    ckpt = tmp_path / "train.pt"
    with pytest.raises(NonFiniteLossError, match=message) as ei:
        train(p, tiny_data / "dataset", split, index, ckpt, progress=False)
    assert str(ckpt) in str(ei.value)
    assert ckpt.read_bytes() == saved[0]
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ============================================================================ 4. params validation

# group -> [(bad value, message fragments)]: wrong type, out of range, unknown key (+ a choice)
BAD_PARAMS = [
    ({"base": {"seed": "six"}}, ["'base.seed'", "expected an integer", "'six'"]),
    ({"base": {"seed": -1}}, ["'base.seed'", "-1 is out of range", ">= 0"]),
    ({"base": {"sed": 1}}, ["unknown params key 'base.sed'", "Did you mean 'base.seed'?", "Allowed keys in 'base': seed"]),
    ({"data": {"crop_size": 64.5}}, ["'data.crop_size'", "expected an integer", "64.5 (float)"]),
    ({"data": {"prepare_workers": 0}}, ["'data.prepare_workers'", "out of range", ">= 1"]),
    ({"data": {"scale_min": 0.0}}, ["'data.scale_min'", "out of range", "> 0.0"]),
    ({"data": {"crop_sise": 64}}, ["unknown params key 'data.crop_sise'", "Did you mean 'data.crop_size'?",
                                   "Allowed keys in 'data':", "crop_size"]),
    ({"data": {"synthetic": {"image_size": "big"}}}, ["'data.synthetic.image_size'", "expected an integer"]),
    ({"data": {"synthetic": {"image_size": 2048}}}, ["'data.synthetic.image_size'", "out of range", "<= 1024"]),
    ({"data": {"synthetic": {"num_trian": 8}}}, ["unknown params key 'data.synthetic.num_trian'",
                                                 "Did you mean 'data.synthetic.num_train'?"]),
    ({"data": {"synthetic": 5}}, ["'data.synthetic'", "expected a mapping"]),
    ({"model": {"hidden_dim": "128"}}, ["'model.hidden_dim'", "expected an integer", "'128' (str)"]),
    ({"model": {"dropout": 1.5}}, ["'model.dropout'", "out of range", "<= 1.0"]),
    ({"model": {"backbone": "vit_b"}}, ["'model.backbone'", "allowed values: resnet18, resnet34, resnet50, resnet101"]),
    ({"model": {"backbon": "resnet18"}}, ["unknown params key 'model.backbon'", "Did you mean 'model.backbone'?"]),
    ({"loss": {"deep_supervision": "yes please"}}, ["'loss.deep_supervision'", "expected true or false"]),
    ({"loss": {"focal_alpha": 2.0}}, ["'loss.focal_alpha'", "out of range", "<= 1.0"]),
    ({"loss": {"pp_form": "kl"}}, ["'loss.pp_form'", "allowed values: cce, ce"]),
    ({"loss": {"pp_pairing": "both"}}, ["'loss.pp_pairing'", "allowed values: cross_image, within_image"]),
    ({"loss": {"simnet_block_convs": 3}}, ["'loss.simnet_block_convs'", "out of range", "<= 2"]),
    ({"loss": {"pp_start": -1}}, ["'loss.pp_start'", "out of range", ">= 0"]),
    ({"loss": {"sim_wieght": 1.0}}, ["unknown params key 'loss.sim_wieght'", "Did you mean 'loss.sim_weight'?"]),
    ({"train": {"batch_size": 8.0}}, ["'train.batch_size'", "expected an integer", "8.0 (float)"]),
    ({"train": {"checkpoint_interval": 0}}, ["'train.checkpoint_interval'", "out of range", ">= 1"]),
    ({"train": {"batch_size": 5}}, ["'train.batch_size'", "must be even"]),
    ({"train": {"iteration": 10}}, ["unknown params key 'train.iteration'", "Did you mean 'train.iterations'?"]),
    ({"eval": {"max_images": "all"}}, ["'eval.max_images'", "expected an integer"]),
    ({"eval": {"max_images": -1}}, ["'eval.max_images'", "out of range", ">= 0"]),
    ({"eval": {"device": "gpu"}}, ["'eval.device'", "allowed values: auto, cpu, cuda"]),
    ({"eval": {"devcie": "cpu"}}, ["unknown params key 'eval.devcie'", "Did you mean 'eval.device'?"]),
    ({"pseudo": {"enabled": "maybe"}}, ["'pseudo.enabled'", "expected true or false"]),
    ({"pseudo": {"iterations": -5}}, ["'pseudo.iterations'", "out of range", ">= 0"]),
    ({"pseudo": {"iters": 5}}, ["unknown params key 'pseudo.iters'", "Allowed keys in 'pseudo': enabled, iterations"]),
    ({"pretrain": {"lr": "fast"}}, ["'pretrain.lr'", "expected a number"]),
    ({"pretrain": {"iterations": 0}}, ["'pretrain.iterations'", "out of range", ">= 1"]),
    ({"pretrain": {"iters": 5}}, ["unknown params key 'pretrain.iters'", "Did you mean 'pretrain.iterations'?"]),
    ({"report": {"title": 5}}, ["'report.title'", "expected a string", "5 (int)"]),
    ({"report": {"smoothing": 0}}, ["'report.smoothing'", "out of range", ">= 1"]),
    ({"report": {"smooth": 3}}, ["unknown params key 'report.smooth'", "Did you mean 'report.smoothing'?"]),
]


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.mark.parametrize("bad, fragments", BAD_PARAMS, ids=lambda x: json.dumps(x) if isinstance(x, dict) else "")
def test_every_group_rejects_wrong_type_range_and_typo(bad, fragments):
    from pipeline.config import ConfigError, build_params
    with pytest.raises(ConfigError) as ei:
        build_params(_merge(small_params(), bad))
    for frag in fragments:
        assert frag in str(ei.value), str(ei.value)


def test_bad_params_cover_every_group_three_ways():
    from pipeline.config import GROUPS
    kinds: dict[str, set] = {g: set() for g in GROUPS}
    for bad, frags in BAD_PARAMS:
        (group,) = bad
        text = " ".join(frags)
        kinds[group] |= {"typo" if "unknown params key" in text else "range" if "out of range" in text
                         else "type" if "expected" in text else "other"}
    assert all({"typo", "range", "type"} <= k for k in kinds.values()), kinds


@pytest.mark.parametrize("bad", [{"train": {"lr": float("nan")}}, {"loss": {"pp_weight": float("inf")}},
                                 {"model": {"dropout": float("nan")}}])
def test_non_finite_float_params_rejected(bad):
    from pipeline.config import ConfigError, build_params
    key = next(f"{g}.{k}" for g, v in bad.items() for k in v)
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'") + ".*finite"):
        build_params(_merge(small_params(), bad))


def _dvc_stage_argv() -> dict[str, list[str]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, st in stages.items():
        # matrix stages: any value for ${item.*} / ${key} (the params error must come first anyway)
        cmd = re.sub(r"\$\{item\.seed\}", "1", st["cmd"])
        argv = shlex.split(re.sub(r"\$\{[^}]+\}", "x", cmd))
        assert argv[:3] == ["python", "-m", f"stages.{name}"], argv
        out[name] = argv[3:]
    return out


STAGE_ARGV = _dvc_stage_argv()


@pytest.mark.parametrize("stage", sorted(STAGE_ARGV))
@pytest.mark.parametrize("bad", [{"train": {"iterations": "many"}}, {"loss": {"focal_alpha": -0.5}},
                                 {"model": {"num_querys": 8}}], ids=["type", "range", "typo"])
def test_stage_exits_2_before_any_output(stage, bad, tmp_path, monkeypatch, capsys):
    write_params(tmp_path / "params.yaml", _merge(small_params(), bad))
    monkeypatch.chdir(tmp_path)                       # dvc.yaml's relative paths land in tmp_path
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    code = run_stage(stage, *STAGE_ARGV[stage], "--no-progress")
    err = capsys.readouterr().err
    assert code == 2
    (group, values), = bad.items()
    assert err.startswith("error: ") and f"{group}.{next(iter(values))}" in err and err.count("\n") == 1, err
    assert files_under(tmp_path) == ["params.yaml"]            # no output, no mlflow.db, no folders


def test_params_file_with_python_tag_is_refused(tmp_path, capsys, monkeypatch):
    """safe_load: a YAML tag that would construct Python objects is a params error, not code."""
    p = tmp_path / "params.yaml"
    p.write_text("base:\n  seed: !!python/object/apply:os.system ['touch pwned']\n")
    monkeypatch.chdir(tmp_path)
    code = run_stage("download", *STAGE_ARGV["download"])
    assert code == 2 and "not valid YAML" in capsys.readouterr().err
    assert files_under(tmp_path) == ["params.yaml"]


# ============================================================================ 5. bad data at train / eval time


def _copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unreadable_training_image_fails_naming_file_and_marks_run_failed(tmp_path, tiny_data, store, capsys):
    """A training image that became unreadable after prepare: the stage fails at the step that
    reads it, names the file, writes no model or curve, and the MLflow run is FAILED."""
    raw = small_params()
    data = _copy_data(tiny_data, tmp_path / "data_copy")
    index = json.loads((data / "split/index.json").read_text())
    first = set(step_batch(data, 0, raw)) | set(step_batch(data, 1, raw))
    victim = next(i for i in step_batch(data, 2, raw) if i not in first)   # read first at step 3
    bad_img = data / "dataset" / index["train"][victim]["image"]
    bad_img.write_bytes(bad_img.read_bytes()[:40])                         # truncated JPEG header
    out = tmp_path / "out"
    code = run_stage("train", *train_argv(out, data, write_params(tmp_path / "params.yaml", raw)))
    err = capsys.readouterr().err
    assert code == 1
    assert f"cannot read image '{bad_img}'" in err, err
    assert not (out / "data/train/model.pt").exists() and not (out / "reports").exists()
    assert torch.load(out / "data/checkpoints/train.pt", weights_only=True)["step"] == 2
    (run,) = runs_in_store(store)
    assert run["status"] == "FAILED" and run["tags"]["stage"] == "train"


def test_label_size_mismatch_at_train_time_names_the_label(tmp_path, tiny_data):
    from pipeline.config import build_params
    from pipeline.engine.train import train
    raw = small_params()
    data = _copy_data(tiny_data, tmp_path / "d")
    index = json.loads((data / "split/index.json").read_text())
    split = json.loads((data / "split/split.json").read_text())
    lab = data / "dataset" / index["train"][step_batch(data, 0, raw)[0]]["label"]
    cv2.imwrite(str(lab), np.zeros((40, 64), np.uint8))
    with pytest.raises(ValueError, match=re.escape(f"label '{lab}' is 64x40 but its image is 64x64")):
        train(build_params(raw), data / "dataset", split, index, tmp_path / "ck.pt", progress=False)
    assert not (tmp_path / "ck.pt").exists()


def test_no_usable_training_image_fails_before_anything(tmp_path, tiny_data):
    from pipeline.config import build_params
    from pipeline.engine.train import train
    index = json.loads((tiny_data / "split/index.json").read_text())
    split = json.loads((tiny_data / "split/split.json").read_text())
    for e in index["train"]:
        e["usable"] = False
    with pytest.raises(ValueError, match="no usable images"):
        train(build_params(small_params()), tiny_data / "dataset", split, index, tmp_path / "ck.pt", progress=False)
    assert files_under(tmp_path) == []


def test_unreadable_test_image_fails_evaluate_naming_file(tmp_path, tiny_data, capsys):
    from pipeline.config import build_params
    from pipeline.engine.train import export_model
    from pipeline.model import build_model
    p = build_params(small_params())
    data = _copy_data(tiny_data, tmp_path / "d")
    split = json.loads((data / "split/split.json").read_text())
    index = json.loads((data / "split/index.json").read_text())
    export_model(build_model(p.model, split["num_classes"], None), p, split, tmp_path / "model.pt")
    bad = data / "dataset" / index["test"][1]["image"]
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    code = run_stage("evaluate", "--params", write_params(tmp_path / "params.yaml", small_params()),
                     "--model", tmp_path / "model.pt", "--dataset-dir", data / "dataset",
                     "--split-dir", data / "split", "--metrics", out / "metrics.json",
                     "--per-class", out / "per_class.csv", "--confusion", out / "confusion.npy", "--no-mlflow",
                     "--no-progress")
    assert code == 1 and f"cannot read image '{bad}'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("fault", ["wrong_checksum", "truncated"])
def test_download_stage_bad_archive_keeps_previous_dataset(fault, tmp_path, monkeypatch, capsys):
    """The download stage on a bad ADE20K archive: exit 1 naming the archive; the dataset
    folder of an earlier run is untouched and no extraction folder is left in raw/."""
    from tests.test_prepare_real import make_ade_zip
    raw_dir = tmp_path / "data/raw"
    raw_dir.mkdir(parents=True)
    arc = make_ade_zip(raw_dir / "ADEChallengeData2016.zip")
    raw = small_params(data={"dataset": "ade20k"})
    if fault == "truncated":
        arc.write_bytes(arc.read_bytes()[:-150])
        raw["data"]["checksum"] = "md5:" + hashlib.md5(arc.read_bytes()).hexdigest()   # verified, but broken
    write_params(tmp_path / "params.yaml", raw)
    previous = tmp_path / "data/dataset"
    previous.mkdir()
    (previous / "classes.json").write_text("from an earlier run")
    monkeypatch.chdir(tmp_path)
    code = run_stage("download", *STAGE_ARGV["download"], "--no-progress")
    err = capsys.readouterr().err
    assert code == 1 and str(Path("data/raw/ADEChallengeData2016.zip")) in err, err
    assert ("checksum mismatch" if fault == "wrong_checksum" else "truncated or corrupt") in err
    assert files_under(previous) == ["classes.json"] and (previous / "classes.json").read_text() == "from an earlier run"
    assert sorted(p.name for p in raw_dir.iterdir()) == ["ADEChallengeData2016.zip"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["dataset", "raw"]


# ============================================================================ 6. security

CODE_DIRS = ("pipeline", "stages", "tests")


def _py_files(dirs=CODE_DIRS):
    for d in dirs:
        yield from sorted((ROOT / d).rglob("*.py"))


def _calls(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


UNSAFE_YAML = {"yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all",
               "yaml.full_load_all", "yaml.Loader", "yaml.UnsafeLoader", "yaml.FullLoader"}


def unsafe_yaml_uses(source: str) -> list[str]:
    tree = ast.parse(source)
    hits = [_dotted(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and _dotted(n) in UNSAFE_YAML]
    hits += [f"from yaml import {a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
             and n.module == "yaml" for a in n.names if f"yaml.{a.name}" in UNSAFE_YAML]
    return hits


def torch_load_without_weights_only(source: str) -> list[int]:
    bad = []
    for c in _calls(ast.parse(source)):
        if _dotted(c.func) == "torch.load":
            kw = {k.arg: k.value for k in c.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                bad.append(c.lineno)
    return bad


def test_security_scanners_can_fail():
    assert unsafe_yaml_uses("import yaml\nyaml.load(s, Loader=yaml.Loader)\n") == ["yaml.load", "yaml.Loader"]
    assert unsafe_yaml_uses("from yaml import unsafe_load\n") == ["from yaml import unsafe_load"]
    assert unsafe_yaml_uses("yaml.safe_load(s)\n") == []
    assert torch_load_without_weights_only("torch.load(p)\ntorch.load(p, weights_only=False)\n"
                                           "torch.load(p, map_location='cpu', weights_only=True)\n") == [1, 2]


def test_yaml_is_only_safe_loaded():
    offenders = {str(f.relative_to(ROOT)): u for f in _py_files() if (u := unsafe_yaml_uses(f.read_text()))}
    assert not offenders, offenders
    assert "yaml.safe_load(" in (ROOT / "pipeline/cli.py").read_text()


def test_every_torch_load_is_weights_only():
    seen, offenders = 0, {}
    for f in _py_files():
        src = f.read_text()
        seen += src.count("torch.load(")
        if bad := torch_load_without_weights_only(src):
            offenders[str(f.relative_to(ROOT))] = bad
    assert not offenders, f"torch.load without weights_only=True (pickled code would run): {offenders}"
    assert seen >= 2
    for f in _py_files(("pipeline", "stages")):                 # no other unpickling of files either
        src = f.read_text()
        assert "pickle.load" not in src and "allow_pickle=True" not in src, f


def test_checkpoint_with_code_is_refused(tmp_path):
    from pipeline.engine.checkpoint import load_checkpoint
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "payload": _Evil()}, path)
    with pytest.raises(ValueError, match=f"checkpoint '{re.escape(str(path))}' cannot be loaded safely"):
        load_checkpoint(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_mlflow_ui_binds_localhost_only():
    readme = (ROOT / "README.md").read_text()
    ui_lines = [ln for ln in readme.splitlines() if re.search(r"\bmlflow (ui|server)\b", ln)]
    assert ui_lines and all("--host 127.0.0.1" in ln for ln in ui_lines), ui_lines
    makefile = (ROOT / "Makefile").read_text()
    m = re.search(r"^ui:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert m, "Makefile has no ui target"
    assert re.search(r"mlflow ui .*--host 127\.0\.0\.1\b", m.group(1)), m.group(1)
    for text in (readme, makefile):
        assert "0.0.0.0" not in text and "--host ::" not in text


# ============================================================================ 7. MLflow trouble


@pytest.mark.parametrize("trouble, says", [("db_is_a_directory", "not a regular file"),
                                            ("root_missing", "does not exist"),
                                            ("locked", "database is locked")])
def test_unusable_store_fails_train_stage_before_training(trouble, says, tmp_path, tiny_data, mlflow_template,
                                                          monkeypatch, capsys):
    from pipeline import tracking
    root = tmp_path / "repo"
    lock = None
    if trouble == "db_is_a_directory":
        (root / "mlflow.db").mkdir(parents=True)
    elif trouble == "locked":                           # another process holds the write lock throughout
        root.mkdir()
        shutil.copy(mlflow_template, root / "mlflow.db")
        lock = sqlite3.connect(root / "mlflow.db", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        monkeypatch.setitem(tracking.RunTracker.__init__.__kwdefaults__, "timeout", 0.5)   # not 30 s
    monkeypatch.setenv("DVC_ROOT", str(root))
    out = tmp_path / "out"
    try:
        code = run_stage("train", *train_argv(out, tiny_data, write_params(tmp_path / "params.yaml",
                                                                           small_params())))
    finally:
        if lock is not None:
            lock.close()
    err = capsys.readouterr().err
    assert code == 1
    assert f"MLflow store {root / 'mlflow.db'}" in err and says in err, err
    assert not out.exists()                              # no checkpoint: it failed before training


LOGGING_BREAKS = r'''
import runpy, sys
from mlflow import MlflowClient
real_log_batch = MlflowClient.log_batch

def log_batch(self, run_id, metrics=(), params=(), tags=(), *a, **k):
    if metrics and max(m.step for m in metrics) >= 3:
        raise RuntimeError("injected: database is locked")
    return real_log_batch(self, run_id, metrics=metrics, params=params, tags=tags, *a, **k)

def log_model_artifacts(self, model_id, local_dir, *a, **k):
    raise OSError("injected: artifact store unreachable")

MlflowClient.log_batch = log_batch
MlflowClient.log_model_artifacts = log_model_artifacts
sys.argv = ["stages/train.py", *sys.argv[1:]]
runpy.run_module("stages.train", run_name="__main__", alter_sys=True)
'''


def test_logging_failures_after_start_warn_and_training_completes(tmp_path, tiny_data, store):
    """The store breaks after the run started (metrics from step 3 on, the MLflow model's files):
    the stage warns on stderr naming the store, still exits 0 and writes every output."""
    driver = tmp_path / "driver.py"
    driver.write_text(LOGGING_BREAKS)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DVC_ROOT": str(store), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(driver), *map(str, train_argv(out, tiny_data,
                        write_params(tmp_path / "params.yaml", small_params())))],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "continuing; the DVC outputs remain the record" in ln]
    assert any(f"MLflow store {store / 'mlflow.db'}: log_metrics failed" in ln and "database is locked" in ln
               for ln in warnings), r.stderr
    assert any("log_model" in ln and "artifact store unreachable" in ln for ln in warnings), r.stderr
    assert torch.load(out / "data/train/model.pt", weights_only=True)["params"]["train"]["iterations"] == 4
    assert (out / "reports/train_curve.csv").read_text().count("\n") == 1 + 4
    (run,) = runs_in_store(store)
    assert run["loss_steps"] == [1, 2] and run["status"] == "FINISHED"
