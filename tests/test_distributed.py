"""Multi-process training (DistributedDataParallel, gloo, CPU).

* 2 processes through the real train stage (which re-launches itself under torchrun) against one
  process with the same global batch: same final weights and logged losses; rank 0 alone writes
  files and logs to MLflow.
* 2 processes with SimLoss / DistLoss and dropout on: every rank ends with the same weights and
  SimNet statistics, and an interrupted run resumes bit-exactly on every rank.
* The loss normalisers: two half batches with the all-ranks counts give the full batch's losses.

Why the 2-vs-1 comparison runs with loss.sim_weight = loss.pp_weight = 0: SimLoss and DistLoss
draw their pixel samples from one sequential generator stream over the batch's image pairs; a
rank cannot continue the stream where the previous rank's pairs left it without their labels,
so rank 1 draws from its own stream (a function of seed, step and rank) and samples other pixels
than the single process does. SimNet's BatchNorm also normalises over each rank's own pixel
pairs (per-GPU BatchNorm, as usual under DDP). Both are properties of the
sampling, not of the gradient reduction; the second test covers those losses under DDP.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.helpers import ROOT, small_params, write_params

ITERATIONS = 3
GLOBAL_BATCH = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra_path: Path | None = None, **kw) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join(str(p) for p in (extra_path, ROOT) if p is not None), **kw}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _exact_params(**train) -> dict:
    """Tiny params for the 2-vs-1 comparison: frozen BatchNorm, no dropout, no point-sampled losses."""
    return small_params(model={"freeze_bn": True, "dropout": 0.0},
                        loss={"sim_weight": 0.0, "pp_weight": 0.0, "mask_points": 0},
                        train={"iterations": ITERATIONS, "batch_size": GLOBAL_BATCH, "checkpoint_interval": 2,
                               "log_interval": 1, "threads": 1, "device": "cpu", "lr": 3e-4, **train})


# Installed in every process of the launched stage (sitecustomize): reports each file-system
# write under the project folder with the writer's rank ("launcher" = the stage before
# re-launch and torchrun's agent). torch.save's own file is opened in C++, but every file of the
# pipeline is written through tempfile.mkstemp + os.replace (pipeline/io.py), which are audited.
AUDIT = r'''
import os, sys
_ROOT = os.environ.get("AUDIT_ROOT", "")
_RANK = os.environ.get("RANK", "launcher")
_W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_EVENTS = {"open", "os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.copyfile", "shutil.rmtree",
           "tempfile.mkstemp", "tempfile.mkdtemp", "sqlite3.connect", "os.truncate"}

def _hook(event, args):
    if event not in _EVENTS or not _ROOT:
        return
    if event == "open":
        path, mode, flags = args
        if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _W):
            return
        paths = [path]
    else:
        paths = list(args)
    for p in paths:
        if not isinstance(p, (str, bytes, os.PathLike)):      # file descriptors, flags
            continue
        p = os.fsdecode(p) if not isinstance(p, str) else p
        if os.path.abspath(p).startswith(_ROOT):
            sys.stderr.write(f"AUDIT rank={_RANK} {event} {p}\n")

sys.addaudithook(_hook)
'''


def _project(root: Path, data: Path, params: dict) -> Path:
    (root / "data").mkdir(parents=True)
    for name in ("dataset", "split"):
        (root / "data" / name).symlink_to(data / name, target_is_directory=True)
    write_params(root / "params.yaml", params)
    return root


def _stage_argv(project: Path) -> list[str]:
    return ["--params", str(project / "params.yaml"), "--dataset-dir", str(project / "data/dataset"),
            "--split-dir", str(project / "data/split"), "--model", str(project / "data/train/model.pt"),
            "--checkpoint", str(project / "data/checkpoints/train.pt"),
            "--curve", str(project / "reports/train_curve.csv"), "--no-progress"]


def test_two_processes_match_one_process(tmp_path, tiny_data, mlflow_template):
    from pipeline.config import build_params
    from pipeline.engine.train import train
    pytest.importorskip("mlflow")
    port = _free_port()
    raw = _exact_params(nproc_per_node=2, dist_backend="gloo", master_port=port)
    project = _project(tmp_path / "proj", tiny_data, raw)
    shutil.copy(mlflow_template, project / "mlflow.db")
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT)

    # The stage as dvc.yaml runs it: nproc_per_node 2 makes it re-launch itself under torchrun.
    r = subprocess.run([sys.executable, "-m", "stages.train", *_stage_argv(project)], cwd=ROOT,
                       env=_env(audit, DVC_ROOT=str(project), AUDIT_ROOT=str(project)),
                       capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log
    assert "torch.distributed.run" in log and f"--master_port {port}" in log
    assert "on 2 processes" in r.stdout

    # Only rank 0 wrote files (the audit's positive control: it did see rank 0's writes).
    writes = [line for line in log.splitlines() if line.startswith("AUDIT ")]
    assert any(w.startswith("AUDIT rank=0 ") and "model.pt" in w for w in writes), log
    assert any(w.startswith("AUDIT rank=0 ") and "train.pt" in w for w in writes), log
    assert [w for w in writes if not w.startswith("AUDIT rank=0 ")] == []

    # The same global batch in one process (the launch keys do not enter the params hash).
    single = build_params(_exact_params())
    model, out = train(single, tiny_data / "dataset", json.loads((tiny_data / "split/split.json").read_text()),
                       json.loads((tiny_data / "split/index.json").read_text()), tmp_path / "single.pt",
                       progress=False)
    ref = model.state_dict()
    got = torch.load(project / "data/train/model.pt", map_location="cpu", weights_only=True)
    assert set(got["model"]) == set(ref)
    diffs = {k: (got["model"][k].double() - ref[k].double()).abs().max().item()
             for k in ref if ref[k].is_floating_point()}
    worst = max(diffs, key=diffs.get)
    print(f"max |w_2proc - w_1proc| = {diffs[worst]:.3g} ({worst})")
    for k in ref:
        # gloo sums the two halves' gradients in another order than one process: AdamW turns last-bit
        # differences of near-zero gradients into update differences up to ~lr (3e-4) per step
        torch.testing.assert_close(got["model"][k], ref[k], rtol=1e-4, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    ck0 = torch.load(project / "data/checkpoints/train.pt", map_location="cpu", weights_only=True)
    assert ck0["step"] == ITERATIONS and len(ck0["rng_cpu_ranks"]) == 2

    curve = pd.read_csv(project / "reports/train_curve.csv")
    ref_curve = pd.DataFrame(out.history)
    assert list(curve["step"]) == list(ref_curve["step"]) == list(range(1, ITERATIONS + 1))
    loss_cols = [c for c in ref_curve if c.startswith("loss")]
    assert {"loss", "loss_ce", "loss_mask", "loss_dice", "loss_comp"} <= set(loss_cols) <= set(curve)
    for c in loss_cols:
        assert curve[c].tolist() == pytest.approx(ref_curve[c].tolist(), rel=1e-4, abs=1e-6), c
    assert curve["lr"].tolist() == pytest.approx(ref_curve["lr"].tolist(), rel=1e-12)

    # MLflow: one run, logged once per step (by rank 0 alone), with the reduced losses.
    con = sqlite3.connect(project / "mlflow.db")
    try:
        runs = con.execute("select run_uuid, status from runs").fetchall()
        steps = con.execute("select step, value from metrics where key = 'loss' order by step").fetchall()
    finally:
        con.close()
    assert len(runs) == 1 and runs[0][1] == "FINISHED"
    assert [s for s, _ in steps] == list(range(1, ITERATIONS + 1))
    assert [v for _, v in steps] == pytest.approx(ref_curve["loss"].tolist(), rel=1e-4)


# Run by torchrun in each of 2 processes: train() directly, with SimLoss / DistLoss and dropout on.
# A: uninterrupted; B: stopped on every rank after step 2 (checkpoint every step: the last one is
# step 1), then resumed. Each rank saves its final state for the test (harness files).
HARNESS = r'''
import json, os, sys
from pathlib import Path
import torch
from pipeline.config import build_params
from pipeline.engine import distributed as D
import pipeline.engine.train as T
from pipeline.engine.train import train

built = []                      # the criterion of each train() call (SimNet and its statistics)
_build = T.build_criterion
T.build_criterion = lambda *a, **k: built.append(_build(*a, **k)) or built[-1]
info = D.init_distributed("gloo", "cpu")
torch.set_num_threads(1)
data, out = Path(sys.argv[1]), Path(sys.argv[2])
p = build_params(json.loads((out / "params.json").read_text()))
split = json.loads((data / "split/split.json").read_text())
index = json.loads((data / "split/index.json").read_text())

class Stop(Exception):
    pass

def stop_at_2(step, rec):
    if step == 2:
        raise Stop

model, o = train(p, data / "dataset", split, index, out / "a.pt", progress=False)
try:
    train(p, data / "dataset", split, index, out / "b.pt", on_log=stop_at_2, progress=False)
    raise SystemExit("not stopped")
except Stop:
    pass
assert torch.load(out / "b.pt", weights_only=True)["step"] == 1
model_b, o_b = train(p, data / "dataset", split, index, out / "b.pt", progress=False)
assert o_b.resumed_from == 1, o_b.resumed_from
torch.save({"a": {"model": model.state_dict(), "history": o.history},
            "b": {"model": model_b.state_dict(), "history": o_b.history},
            "criterion_a": built[0].state_dict(), "criterion_b": built[-1].state_dict()},
           out / f"rank{info.rank}.pt")
D.cleanup()
'''


def test_two_processes_similarity_losses_and_resume(tmp_path, tiny_data):
    from pipeline.config import build_params
    raw = small_params(model={"dropout": 0.1},
                       train={"iterations": ITERATIONS, "batch_size": GLOBAL_BATCH, "checkpoint_interval": 1,
                              "log_interval": 1, "threads": 1, "device": "cpu"})
    p = build_params(raw)
    assert p.loss.sim_weight > 0 and p.loss.pp_weight > 0 and not p.model.freeze_bn
    (tmp_path / "params.json").write_text(json.dumps(raw))
    (tmp_path / "harness.py").write_text(HARNESS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(tmp_path / "harness.py"), str(tiny_data), str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]

    # DDP kept the ranks' weights identical. (BatchNorm running statistics are per rank: DDP
    # broadcasts rank 0's before each forward, then each rank's batch updates its own copy.)
    for run in ("a", "b"):
        for k, v in ranks[0][run]["model"].items():
            if "running_" not in k and "num_batches" not in k:
                assert torch.equal(v, ranks[1][run]["model"][k]), (run, k)
    # The criterion's SimNet is outside DDP: its gradients are averaged by the loop; the
    # SimilarityStats counts are summed over the ranks before every update.
    for run in ("criterion_a", "criterion_b"):
        for k, v in ranks[0][run].items():
            if "running_" not in k and "num_batches" not in k:
                assert torch.equal(v, ranks[1][run][k]), (run, k)
    crit = ranks[0]["criterion_a"]
    assert float(crit["similarity.stats.pos"]) > 0 and float(crit["similarity.stats.neg"]) > 0
    assert any("simnet" in k for k in crit)
    ck = torch.load(tmp_path / "a.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng_cpu_ranks"]) == 2
    assert not torch.equal(ck["rng_cpu_ranks"][0], ck["rng_cpu_ranks"][1])     # per-rank dropout streams
    # the losses of both kinds were on and logged (means over the ranks)
    hist = ranks[0]["a"]["history"]
    assert len(hist) == ITERATIONS
    assert all(h["loss_sim"] > 0 and h["loss_dist"] != 0 for h in hist)       # (cce DistLoss is negative)
    assert [h["loss"] for h in hist] == [h["loss"] for h in ranks[1]["a"]["history"]]

    # Interrupted after step 2 (last checkpoint: step 1) and resumed: bit-identical on every rank.
    for i in range(2):
        for k, v in ranks[i]["a"]["model"].items():
            assert torch.equal(v, ranks[i]["b"]["model"][k]), (i, k)
        for k, v in ranks[i]["criterion_a"].items():
            # a resumed rank > 0 starts from rank 0's SimNet BatchNorm running statistics (SimNet runs in
            # training mode only, so they never reach a loss)
            if not (i and "simnet" in k and ("running_" in k or "num_batches" in k)):
                assert torch.equal(v, ranks[i]["criterion_b"][k]), (i, k)
    assert [h["loss"] for h in ranks[0]["b"]["history"]] == [h["loss"] for h in hist]


def test_normalizer_gives_the_full_batch_losses():
    """Two 'ranks' (the halves of a batch) with the all-ranks counts: the mean of their losses
    equals the loss of the whole batch, term by term, and SimilarityStats get the global counts."""
    from pipeline.config import build_params
    from pipeline.data.targets import weak_shot_targets
    from pipeline.engine.train import build_criterion
    from pipeline.losses.similarity import SimilarityStats, class_balanced_bce
    from pipeline.model import build_model

    p = build_params(small_params(loss={"sim_weight": 0.0, "pp_weight": 0.0}))
    base, novel = list(range(18)), list(range(18, 24))
    torch.manual_seed(0)
    model = build_model(p.model, 24, None).eval()
    crit = build_criterion(p, 24, base, novel)
    sem = torch.randint(0, 24, (4, 64, 64))
    sem[1] = torch.randint(0, 18, (64, 64))          # an image without novel targets: CompLoss counts 3 of 4
    valid = torch.ones(4, 64, 64, dtype=torch.bool)
    targets = weak_shot_targets(sem, valid, torch.tensor(base), torch.tensor(novel), False)
    with torch.no_grad():
        outputs = model(torch.randn(4, 3, 64, 64))
    full = crit(outputs, targets)

    def half(out, r):
        sl = slice(2 * r, 2 * r + 2)
        return {k: (v[sl] if torch.is_tensor(v) else [half(a, r) for a in v]) for k, v in out.items()}

    class Recorder:                   # pass 1: each rank's local counts, in call order
        world_size = 2

        def __init__(self):
            self.counts = []

        def total(self, n, device=None):
            self.counts.append(torch.as_tensor(n, dtype=torch.float64))
            return torch.as_tensor(n, dtype=torch.float64)

        def __call__(self, n, device=None):
            return self.total(n, device)

    class Global(Recorder):           # pass 2: the sums over both ranks, as GlobalCount gives them
        def __init__(self, sums):
            self.sums, self.i = sums, 0

        def total(self, n, device=None):
            self.i += 1
            return self.sums[self.i - 1]

        def __call__(self, n, device=None):
            return self.total(n, device) / self.world_size

    local = [crit(half(outputs, r), targets[2 * r:2 * r + 2]) for r in range(2)]     # the ranks' own counts
    assert any(float((local[0][k] + local[1][k]) / 2) != pytest.approx(float(full[k]), rel=1e-3) for k in full)
    recs = [Recorder(), Recorder()]
    for r in range(2):
        crit.normalizer = recs[r]
        crit(half(outputs, r), targets[2 * r:2 * r + 2])
    assert len(recs[0].counts) == len(recs[1].counts) > 0
    sums = [a + b for a, b in zip(recs[0].counts, recs[1].counts)]
    per_rank = []
    for r in range(2):
        crit.normalizer = Global(sums)
        per_rank.append(crit(half(outputs, r), targets[2 * r:2 * r + 2]))
    crit.normalizer = None
    assert set(full) == set(per_rank[0])
    for k in full:
        assert float((per_rank[0][k] + per_rank[1][k]) / 2) == pytest.approx(float(full[k]), rel=1e-5), k

    # SimLoss's class-balanced BCE: global counts into the stats, global #valid as normaliser.
    g = torch.Generator().manual_seed(0)
    prob, tgt = torch.rand(40, generator=g), (torch.rand(40, generator=g) > 0.7).float()
    val = torch.rand(40, generator=g) > 0.2
    stats_full = SimilarityStats()
    ref = class_balanced_bce(prob, tgt, val, stats_full)
    counts = [torch.stack([(val[s] & (tgt[s] > 0.5)).sum(), (val[s] & (tgt[s] <= 0.5)).sum()]).double()
              for s in (slice(0, 20), slice(20, 40))]
    losses, stats = [], []
    for r, s in enumerate((slice(0, 20), slice(20, 40))):
        st = SimilarityStats()
        losses.append(class_balanced_bce(prob[s], tgt[s], val[s], st, Global([counts[0] + counts[1]])))
        stats.append(st)
    assert float((losses[0] + losses[1]) / 2) == pytest.approx(float(ref), rel=1e-5)
    for st in stats:
        assert float(st.pos) == float(stats_full.pos) and float(st.neg) == float(stats_full.neg)


def test_relaunch_command_and_world_checks():
    from pipeline.config import ConfigError, build_params, params_hash
    from stages.train import torchrun_argv

    raw = small_params(train={"nproc_per_node": 4, "nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.5",
                              "master_port": 29555, "batch_size": 16})
    p = build_params(raw)
    argv = ["--params", "params.yaml", "--dataset-dir", "data/dataset", "--no-progress"]
    assert torchrun_argv(p, argv) == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--nnodes", "2",
        "--node_rank", "1", "--master_addr", "10.0.0.5", "--master_port", "29555",
        "-m", "stages.train", *argv]
    # the launch keys leave the params hash alone: a checkpoint resumes on another number of GPUs
    assert params_hash(p) == params_hash(build_params(small_params(train={"batch_size": 16})))

    def err(**train) -> str:
        with pytest.raises(ConfigError) as e:
            build_params(small_params(train=train))
        return str(e.value)

    msg = err(nproc_per_node=3, batch_size=4)
    assert "'train.batch_size'" in msg and "train.nproc_per_node" in msg and "divisible" in msg
    msg = err(nproc_per_node=2, nnodes=2, batch_size=4)        # 1 image per process: a pair would be split
    assert "'train.batch_size'" in msg and "even" in msg and "train.pair_sampling" in msg
    assert "'train.node_rank'" in err(nnodes=2, node_rank=2)
    assert "train.dist_backend" in err(dist_backend="mpi")
    assert "train.nproc_per_node" in err(nproc_per_node=0)
    build_params(small_params(train={"nproc_per_node": 2, "batch_size": 4}))      # 2 per process: fine
