"""The grid's executor settings (ablation.executor, ablation.slurm), the checks made before anything
is submitted, Slurm's environment for multi-node training, and the MLflow logging of cells that
ran elsewhere. No Slurm needed here (a stand-in `sbatch` where one is needed); the real cluster
is tests/test_slurm.py."""
from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import ConfigError, SlurmConfig, build_ablation, params_hash  # noqa: E402
from pipeline.engine.distributed import first_host, node_placement  # noqa: E402

RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def _grid(**over) -> dict:
    g = json.loads(json.dumps(RAW["ablation"]))
    for k, v in over.items():
        if isinstance(v, dict):
            g[k].update(v)
        else:
            g[k] = v
    return g


# ----------------------------------------------------------------------------- params
def test_params_yaml_sets_the_executor_and_its_slurm_request():
    g = build_ablation(RAW["ablation"])
    assert g.executor == "local"
    assert isinstance(g.slurm, SlurmConfig) and g.slurm.cpus_per_cell >= 1 and g.slurm.time_min >= 1


@pytest.mark.parametrize("over, message", [
    ({"executor": "pbs"}, "params key 'ablation.executor': 'pbs' is not allowed; allowed values: local, slurm"),
    ({"slurm": {"cpus_per_cell": 0}}, "'ablation.slurm.cpus_per_cell': 0 is out of range"),
    ({"slurm": {"partiton": "gpu"}}, "unknown params key 'ablation.slurm.partiton'. Did you mean "
                                     "'ablation.slurm.partition'?"),
    ({"slurm": {"mem_gb": "8G"}}, "'ablation.slurm.mem_gb': expected an integer, got '8G'"),
])
def test_bad_executor_settings_name_the_key(over, message):
    with pytest.raises(ConfigError) as e:
        build_ablation(_grid(**over))
    assert message in str(e.value)


def test_missing_slurm_key_is_named():
    g = _grid()
    del g["slurm"]["time_min"]
    with pytest.raises(ConfigError, match="'ablation.slurm.time_min' is missing"):
        build_ablation(g)


def test_slurm_cells_take_the_request_s_cores_as_threads():
    from pipeline.grid import plan_cells
    raw = json.loads(json.dumps(RAW))
    raw["train"]["threads"] = 0
    raw["ablation"] = _grid(executor="slurm", run=["baseline"], seeds=[6, 7], slurm={"cpus_per_cell": 3,
                                                                                   "array_parallelism": 5})
    from pipeline.config import build_params
    jobs, workers, threads = plan_cells(build_params(raw), raw, build_ablation(raw["ablation"]), "", dataset_dir=Path("d"),
                                        split_dir=Path("s"), init=None, main_model=Path("m"),
                                        checkpoints=Path("c"), out=Path("o"), cores=64)
    assert (workers, threads) == (2, 3) and all(j.threads == 3 and not j.progress for j in jobs)


def test_the_request_leaves_unset_settings_to_the_cluster():
    from pipeline.executor import _sbatch_args, request
    cfg = SlurmConfig(partition="", gpus_per_cell=0, cpus_per_cell=2, mem_gb=0, time_min=30, array_parallelism=4)
    assert request(cfg) == {"job_name": "simformer-cell", "time": 30, "nodes": 1, "cpus_per_task": 2,
                            "array_parallelism": 4}
    cfg = SlurmConfig(partition="gpu", gpus_per_cell=1, cpus_per_cell=8, mem_gb=32, time_min=120, array_parallelism=2)
    assert _sbatch_args(cfg) == ["--time=120", "--nodes=1", "--cpus-per-task=8", "--partition=gpu",
                                 "--gpus-per-node=1", "--mem=32G"]


# ----------------------------------------------------------------------------- before anything is submitted
def _stage(tmp_path: Path, monkeypatch, grid: dict, path: str) -> tuple[int, str]:
    """The ablate stage in-process with ``grid`` and PATH ``path``; (exit status, stderr)."""
    import importlib

    from pipeline.cli import run
    raw = json.loads(json.dumps(RAW))
    raw["ablation"] = grid
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    mod = importlib.import_module("stages.ablate")
    monkeypatch.setattr(sys, "argv", ["stages/ablate.py", "--params", str(params), "--dataset-dir",
                                      str(tmp_path / "dataset"), "--split-dir", str(tmp_path / "split"),
                                      "--main-model", str(tmp_path / "model.pt"), "--checkpoints",
                                      str(tmp_path / "ck"), "--out", str(tmp_path / "out"), "--no-progress"])
    try:
        run(mod.main)
        return 0, ""
    except SystemExit as e:
        return e.code, ""


def _nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_unknown_executor_fails_before_any_work(tmp_path, monkeypatch, capsys):
    rc, _ = _stage(tmp_path, monkeypatch, _grid(executor="kubernetes"), os.environ["PATH"])
    assert rc == 2
    assert "params key 'ablation.executor': 'kubernetes' is not allowed" in capsys.readouterr().err
    _nothing_written(tmp_path)


def test_slurm_without_sbatch_fails_before_any_work(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "bin"
    empty.mkdir()
    rc, _ = _stage(tmp_path, monkeypatch, _grid(executor="slurm"), str(empty))
    err = capsys.readouterr().err
    assert rc == 1 and "ablation.executor is 'slurm' but 'sbatch' is not on PATH" in err
    assert err.count("error:") == 1
    _nothing_written(tmp_path)


def test_a_request_slurm_rejects_fails_before_any_work(tmp_path, monkeypatch, capsys):
    """A stand-in sbatch that answers --test-only as Slurm does for an unknown partition; a real
    submission would leave a mark."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text(
        "#!/bin/sh\n"
        f"echo \"$@\" > {tmp_path}/sbatch-args\n"
        "case \"$*\" in *--test-only*) echo 'sbatch: error: invalid partition specified: nope' >&2; "
        "echo 'allocation failure: Invalid partition name specified' >&2; exit 1;; esac\n"
        f"touch {tmp_path}/submitted; echo 'Submitted batch job 1'\n")
    (bin_ / "sbatch").chmod(0o755)
    rc, _ = _stage(tmp_path, monkeypatch, _grid(executor="slurm", slurm={"partition": "nope"}),
                   f"{bin_}:{os.environ['PATH']}")
    err = capsys.readouterr().err
    assert rc == 1
    assert "Slurm rejects the request of a grid cell (ablation.slurm: partition 'nope'" in err
    assert "invalid partition specified: nope" in err
    assert "--test-only" in (tmp_path / "sbatch-args").read_text()
    assert not (tmp_path / "submitted").exists()
    _nothing_written(tmp_path)


# ----------------------------------------------------------------------------- multi-node training under Slurm
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NODEID": "2", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "gpu[07-09,12]"}


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[07-09,12]", "gpu07"), ("node1", "node1"), ("a[3,5],b[1-2]", "a3"), ("c1,c[2-4]", "c1"),
    ("rack[2-3]-n[010-012]", "rack2-n010"), ("x[9]", "x9"),
])
def test_first_host_of_a_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_node_rank_and_master_come_from_slurm():
    seen = []

    def expand(nodelist):
        seen.append(nodelist)
        return first_host(nodelist)
    assert node_placement(4, 0, "127.0.0.1", SLURM, first=expand) == (2, "gpu07", "slurm")
    assert seen == ["gpu[07-09,12]"]
    # the params' node_rank / master_addr are not used under Slurm: no hand-set rank per node
    assert node_placement(4, 3, "10.1.1.1", {**SLURM, "SLURM_NODEID": "0"}) == (0, "gpu07", "slurm")


def test_outside_slurm_or_on_one_node_the_params_rule():
    assert node_placement(4, 3, "10.1.1.1", {}) == (3, "10.1.1.1", "params")
    assert node_placement(1, 0, "127.0.0.1", SLURM) == (0, "127.0.0.1", "params")


@pytest.mark.parametrize("env, message", [
    ({**SLURM, "SLURM_NNODES": "2"}, "train.nnodes is 4 but Slurm job 4242 has 2 nodes (SLURM_NNODES)"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_NODEID"}, "SLURM_NODEID is not set: start the stage once per "
                                                              "node with srun"),
    ({**SLURM, "SLURM_NODEID": "x"}, "are not integers"),
])
def test_bad_slurm_environment_is_named(env, message):
    with pytest.raises(RuntimeError) as e:
        node_placement(4, 0, "127.0.0.1", env)
    assert message in str(e.value)


def test_scontrol_expands_the_node_list_like_the_parser():
    import shutil
    import subprocess
    if not shutil.which("scontrol"):
        pytest.skip("scontrol is not on PATH (Slurm not installed): the parser alone is tested")
    from pipeline.engine.distributed import slurm_first_host
    for nodelist in ("gpu[07-09,12]", "a[3,5],b[1-2]", "rack[2-3]-n[010-012]"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        assert out.stdout.split()[0] == first_host(nodelist) == slurm_first_host(nodelist)


def test_the_train_stage_launches_torchrun_with_slurm_s_placement():
    from pipeline.config import build_params
    from stages.train import torchrun_argv
    raw = json.loads(json.dumps(RAW))
    raw["train"].update({"nproc_per_node": 2, "nnodes": 4, "node_rank": 0, "master_addr": "127.0.0.1",
                         "master_port": 29511, "batch_size": 16})
    cmd = torchrun_argv(build_params(raw), ["--no-progress"], env=SLURM)
    i = cmd.index("--node_rank")
    assert cmd[i:i + 8] == ["--node_rank", "2", "--master_addr", "gpu07", "--master_port", "29511", "-m",
                            "stages.train"]
    assert cmd[cmd.index("--nnodes") + 1] == "4"


# ----------------------------------------------------------------------------- gathered cells logged to MLflow
def _tiny(raw: dict) -> dict:
    raw = json.loads(json.dumps(raw))
    raw["data"].update({"crop_size": 64, "scale_min": 0.5, "scale_max": 1.5, "prepare_workers": 1})
    raw["data"]["synthetic"].update({"num_train": 16, "num_test": 4, "image_size": 64})
    raw["model"].update({"hidden_dim": 32, "num_queries": 8, "nheads": 2, "dec_layers": 2, "dim_feedforward": 64,
                         "conv_dim": 32, "mask_dim": 32, "gn_groups": 8, "pretrained": "none"})
    raw["loss"].update({"sim_points": 10, "sim_base_points": 8, "pp_points": 10})
    raw["train"].update({"iterations": 4, "batch_size": 4, "checkpoint_interval": 2, "log_interval": 1, "threads": 1,
                         "diagnostics_interval": 0, "warmup": 0, "freeze": "none", "device": "cpu"})
    raw["eval"]["device"] = "cpu"
    return raw


def test_a_gathered_cell_is_logged_once(tmp_path, monkeypatch):
    """A cell run with mlflow=False (as on a Slurm node without a tracking server), then logged
    from its outputs: one run with params, curve, model and metrics; logging again adds nothing."""
    pytest.importorskip("mlflow")
    from pipeline.config import build_params
    from pipeline.data.splits import build_split, write_split
    from pipeline.data.synthetic import generate_dataset
    from pipeline.grid import log_gathered_cell, plan_cells, run_cell

    raw = _tiny(RAW)
    raw["ablation"] = _grid(seeds=[5], iterations=3, run=["baseline"])
    p = build_params(raw)
    generate_dataset(tmp_path / "dataset", p.data.synthetic, p.base.seed, progress=False)
    split, index = build_split(tmp_path / "dataset", "synthetic", 1, progress=False)
    write_split(tmp_path / "split", split, index)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (job,), _, _ = plan_cells(p, raw, build_ablation(raw["ablation"]), "", dataset_dir=tmp_path / "dataset",
                              split_dir=tmp_path / "split", init=None, main_model=tmp_path / "none.pt",
                              checkpoints=tmp_path / "ck", out=tmp_path / "out", cores=1, mlflow=False,
                              progress=False)
    assert not job.shared
    run_cell(job)
    assert json.loads((job.out / "cell.json").read_text())["run_id"] is None
    assert not (tmp_path / "mlflow.db").exists()         # the cell itself logged nothing

    run_id = log_gathered_cell(job)
    assert json.loads((job.out / "cell.json").read_text())["run_id"] == run_id

    def store():
        con = sqlite3.connect(tmp_path / "mlflow.db")
        try:
            runs = con.execute("select run_uuid, status from runs").fetchall()
            metrics = con.execute("select key, step, value from metrics order by key, step").fetchall()
            tags = dict(con.execute("select key, value from tags where run_uuid = ?", (run_id,)).fetchall())
            models = con.execute("select count(*) from logged_models").fetchone()[0]
        finally:
            con.close()
        return runs, metrics, tags, models

    runs, metrics, tags, models = store()
    assert runs == [(run_id, "FINISHED")] and models == 1
    assert tags["params_hash"] == params_hash(job.params) and tags["variant"] == "baseline" and tags["seed"] == "5"
    m = json.loads((job.out / "metrics.json").read_text())
    assert ("mIoU", 0, m["mIoU"]) in metrics
    assert sorted(s for k, s, _ in metrics if k == "loss") == [1, 2, 3]          # the curve, per step
    heldout = json.loads((job.out / "cell.json").read_text())["heldout"]      # metrics, as run_cell logs them
    assert heldout and all((k, 0, v) in metrics for k, v in heldout.items() if v is not None)
    assert "eval.heldout" not in tags

    assert log_gathered_cell(job) == run_id
    assert store() == (runs, metrics, tags, models)
