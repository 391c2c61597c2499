"""DVC stage `train`: train SimFormer (MaskFormer + complementary and dual similarity losses).

Runs on CUDA when present (train.device: auto), else on CPU. Resumes from --checkpoint
when it holds a checkpoint of the same params. Logs params, the whole params file,
per-step losses, the resumable checkpoint (every train.checkpoint_interval steps; the newest
train.mlflow_checkpoints kept), the held-out pixel-pair AUCs of SimNet, the student and the
features (heldout_auc_*, pipeline/engine/heldout.py) and the trained model (an MLflow model,
registered as simformer-<dataset>-split<k>) to MLflow: $MLFLOW_TRACKING_URI when set, else the
SQLite store at the repository root (found through $DVC_ROOT under `dvc exp run`). With
train.threads 0 the CPU cores are shared among the trainings running on the machine.

--resume-from runs:/<run_id> (e.g. a run of another machine, on a shared tracking server)
first downloads the newest checkpoint that run logged to --checkpoint, then resumes as from a
local checkpoint; refused, before any work, for a run that does not exist or has no checkpoint
and for other params. Its MLflow run is chosen as for a local resume (the newest unfinished run
of these params goes on): resuming a killed or failed run continues that run, as `dvc repro`
does after a kill; a finished run is never written to, the training gets a new run tagged
resumed_from_run_id, with the checkpoint's curve (pipeline.tracking.mark_resumed, docs/MLFLOW.md).

Multi-GPU / multi-node: with train.nproc_per_node x train.nnodes > 1 the stage re-launches
itself under torchrun (DistributedDataParallel, train.batch_size is the global batch); rank 0
alone logs to MLflow and writes the model, the curve and the checkpoints. Inside a Slurm job
(one `srun` task per node) the node rank and master address come from Slurm's environment
(SLURM_NODEID, the first host of SLURM_JOB_NODELIST): docs/CLUSTER.md.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import contextlib
from pathlib import Path

from pipeline.cli import add_init, add_inputs, load_params_raw, parser, run
from pipeline.io import read_json


def main() -> None:
    ap = parser(__doc__, epilog=params_help())
    add_inputs(ap)
    add_init(ap)
    ap.add_argument("--model", type=Path, required=True, help="trained model file to write")
    ap.add_argument("--checkpoint", type=Path, required=True, help="resumable checkpoint (kept across runs)")
    ap.add_argument("--curve", type=Path, required=True, help="training curve CSV to write")
    ap.add_argument("--resume-from", default=None, metavar="runs:/<run_id>",
                    help="resume from the newest checkpoint this MLflow run logged (train.mlflow_checkpoints > 0), "
                         "downloaded to --checkpoint first; the params must be the run's")
    ap.add_argument("--run-name", default=None,
                    help="MLflow run name (default: '<variant>-seed<seed> (main)', e.g. 'full-seed6 (main)': the "
                         "grid cell this training is; '@<DVC experiment>' is appended under `dvc exp run`)")
    args = ap.parse_args()
    p, params_text, _, grid = load_params_raw(args.params)
    split = read_json(args.split_dir / "split.json")
    index = read_json(args.split_dir / "index.json")

    from pipeline.engine import distributed as D
    if args.resume_from and not D.under_torchrun():      # once, before torchrun starts the training processes
        from pipeline.repo import store_root
        from pipeline.tracking import fetch_checkpoint
        got = fetch_checkpoint(store_root(), args.resume_from, p, args.checkpoint)
        print(f"resuming from {args.resume_from}: {got['file']} (step {got['step']}, run {got['status']}) "
              f"-> {args.checkpoint}", flush=True)
    if p.train.nproc_per_node * p.train.nnodes > 1 and not D.under_torchrun():
        sys.exit(relaunch(torchrun_argv(p, sys.argv[1:])))

    from pipeline.data.dataset import input_example
    from pipeline.engine.diagnostics import diagnostics_hook
    from pipeline.engine.heldout import HELDOUT_SEED, heldout_similarity
    from pipeline.engine.pretrain import load_init
    from pipeline.engine.train import export_model, train
    from pipeline.io import write_csv
    from pipeline.jobs import CoreShare
    from pipeline.ablation import main_run_name
    from pipeline.engine.train import curve_table
    from pipeline.tracking import (DatasetRef, log_resumed_curve, log_trained_model, mark_resumed, novel_mask_tags,
                                   open_tracker, run_id_of, training_callbacks)

    dist = D.init_distributed(p.train.dist_backend, p.train.device) if D.under_torchrun() else D.DistInfo()
    try:
        # rank 0 alone logs and writes files; the other ranks only train
        tags = {"stage": "train", **novel_mask_tags(p)}
        tracker = None if args.no_mlflow or not dist.is_main else open_tracker(
            p, params_text, tags, args.run_name or main_run_name(grid, p.base.seed))
        if tracker:
            if args.resume_from:
                mark_resumed(tracker, run_id_of(args.resume_from))
            tracker.log_dataset(DatasetRef.of_folder(p.data.dataset, args.dataset_dir))
            tracker.start_system_metrics()
        # FINISHED on success, FAILED on an error, KILLED on Ctrl-C / SIGTERM (RunTracker.__exit__)
        with tracker or contextlib.nullcontext(), CoreShare(p.train.threads) as cores:
            model, out = train(p, args.dataset_dir, split, index, args.checkpoint,
                               **training_callbacks(tracker, cores, p), progress=not args.no_progress,
                               init=load_init(args.init, p.model.pretrained),
                               diagnostics=diagnostics_hook(p.train.diagnostics_interval, split, p.base.seed,
                                                            p.loss.oracle))
            if dist.is_main:
                export_model(model, p, split, args.model, out.history, out.simnet)
                write_csv(args.curve, curve_table(out.history))
                # SimNet, student and features on the fixed held-out test pixel pairs (pipeline/engine/heldout.py)
                heldout = heldout_similarity(model, out.simnet, args.dataset_dir, index, split, HELDOUT_SEED,
                                             short_edge=p.data.test_short_edge, max_edge=p.data.test_max_edge)
                print("held-out pixel-pair AUC: " + ", ".join(
                    f"{k.removeprefix('heldout_auc_')} {v:.3f}" for k, v in heldout.items() if k.startswith("heldout_auc")))
            if tracker:
                if args.resume_from:
                    log_resumed_curve(tracker, out.history, out.resumed_from)
                tracker.log_metrics(heldout)
                log_trained_model(tracker, args.model, input_example(args.dataset_dir, index), cores, register=True)
    finally:
        D.cleanup()
    if dist.is_main:
        last = out.history[-1] if out.history else {}
        print(f"trained {out.steps} steps (resumed from {out.resumed_from}) in {out.seconds:.0f}s"
              + (f" on {dist.world_size} processes" if dist.distributed else "")
              + f"; final loss {last.get('loss', float('nan')):.4f}; model -> {args.model}")
        if tracker:
            print(f"MLflow run {tracker.run_id} ({tracker.experiment}): {tracker.runs_url()}")


def params_help(argv: list[str] | None = None) -> str:
    """Every params key with the value in force in the --params file (read before --help prints)."""
    import argparse

    import yaml

    from pipeline.config import describe
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--params", type=Path, default=Path("params.yaml"))
    path = pre.parse_known_args(argv)[0].params
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        return f"params keys: cannot read '{path}': {e}"
    return f"params keys, with the values in force in '{path}':\n" + describe(raw if isinstance(raw, dict) else {})


def torchrun_argv(p, argv: list[str], env=None) -> list[str]:
    """``python -m torch.distributed.run ... -m stages.train argv...`` for this node (train.*; under
    Slurm with train.nnodes > 1 the node rank and master address come from Slurm's environment:
    pipeline.engine.distributed.node_placement)."""
    from pipeline.engine.distributed import launch_argv, node_placement
    t = p.train
    node_rank, master_addr, source = node_placement(t.nnodes, t.node_rank, t.master_addr, env)
    if source == "slurm":
        print(f"Slurm: node rank {node_rank} of {t.nnodes}, master {master_addr}:{t.master_port} (from SLURM_NODEID "
              "and SLURM_JOB_NODELIST; train.node_rank and train.master_addr are not used)", file=sys.stderr)
    return launch_argv(t.nproc_per_node, t.nnodes, node_rank, master_addr, t.master_port, "stages.train", argv)


def relaunch(cmd: list[str]) -> int:
    """Run ``cmd`` (torchrun) and return its exit status; on Ctrl-C / SIGTERM, stop it with SIGTERM
    (torchrun passes it on to the training processes) before unwinding."""
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd)
    try:
        rc = proc.wait()
    except BaseException:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    run(main)
