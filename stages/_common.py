"""What every stage shares: argument parsing with the params file, and clean failures.

A stage fails before any work when params.yaml is invalid, printing one line that names
the key and the allowed values, and exits with status 2 (1 for errors during the work).
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Callable

import yaml

from pipeline.config import ConfigError, Params, build_params


def parser(description: str, epilog: str = "") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", type=Path, help="params file (default: params.yaml)")
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return ap


def add_inputs(ap: argparse.ArgumentParser, *, model: bool = False, required: bool = True,
               mlflow: bool = True) -> None:
    """The inputs most stages share: the prepared dataset, the split, the trained model."""
    ap.add_argument("--dataset-dir", type=Path, required=required, help="prepared dataset folder (download stage)")
    ap.add_argument("--split-dir", type=Path, required=required,
                    help="split folder: split.json, index.json (prepare stage)")
    if model:
        ap.add_argument("--model", type=Path, required=required, help="trained model file (train stage)")
    if mlflow:
        ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")


def load_params(path: Path) -> tuple[Params, str]:
    """Validated params and the file's text (logged whole to MLflow)."""
    p, text, _ = load_params_raw(path)
    return p, text


def load_params_raw(path: Path) -> tuple[Params, str, dict]:
    """Validated params, the file's text and the parsed mapping.

    Every group is validated here, before any work: the typed groups and the ablation
    grid, including every variant's overrides.
    """
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read params file '{path}': {e.strerror}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"params file '{path}' is not valid YAML: {e}") from e
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"params file '{path}': expected a mapping of params groups at the top level")
    raw = raw or {}
    params = build_params(raw)
    if "ablation" in raw:
        from pipeline.ablation import cell_params, parse_ablation
        grid = parse_ablation(raw["ablation"])
        for variant in grid.declared:
            cell_params(raw, grid, variant, grid.seeds[0])
    return params, text, raw


def _terminate(signum, frame):
    # SIGTERM (a scheduler's pre-emption) unwinds like Ctrl-C: MLflow runs are marked KILLED
    # (resumable) and no output is half-written (every write is atomic).
    raise KeyboardInterrupt(f"signal {signum}")


def run(main: Callable[[], None]) -> None:
    """Run a stage's main, turning expected failures into one clear line and a non-zero exit."""
    import signal
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        if "--debug" in sys.argv or __import__("os").environ.get("SIMFORMER_DEBUG"):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def read_json(path: Path) -> dict:
    """A JSON input of a stage, with an error naming the file and the stage that makes it."""
    import json
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"'{path}' is missing: run the stage that produces it first (dvc repro)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"'{path}' is not valid JSON: {e}") from None


def write_eval_outputs(metrics_path: Path, per_class_path: Path, summary: dict, per_class: list[dict]) -> dict:
    """The metrics (``SUMMARY_KEYS`` only: ``dvc metrics show`` lists nothing else) and the
    per-class table; returns the evaluation's other facts (dataset, split, class and pixel
    counts) for MLflow tags and cell.json."""
    import pandas as pd

    from pipeline.engine.metrics import SUMMARY_KEYS, metrics_to_json
    from pipeline.io import atomic_path, write_json
    write_json(metrics_path, metrics_to_json({k: summary[k] for k in SUMMARY_KEYS}))
    with atomic_path(per_class_path) as tmp:
        pd.DataFrame(per_class).to_csv(tmp, index=False)
    return {k: v for k, v in summary.items() if k not in SUMMARY_KEYS}


def write_curve(path: Path, history: list[dict]) -> None:
    import pandas as pd

    from pipeline.io import atomic_path
    with atomic_path(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)


def open_tracker(p: Params, params_text: str, tags: dict, run_name: str, phash: str | None = None,
                 include_finished: bool = False):
    """Start, resume or reopen (by params hash) this config's MLflow run; fails before any work
    when the store cannot be opened. ``params_text`` is logged as the run's params.yaml."""
    from pipeline import repo, tracking
    from pipeline.config import flatten, params_hash, to_dict
    tracker = tracking.RunTracker(repo.store_root(), tracking.experiment_name(p.data.dataset, p.data.split))
    tracker.start(phash or params_hash(p), tracking.run_name(run_name), flatten(to_dict(p)), params_text, tags=tags,
                  include_finished=include_finished)
    return tracker


def training_callbacks(tracker, cores):
    """``on_log`` of the training loop: forward a step's record to MLflow and re-share the CPU
    cores among the trainings running (:class:`pipeline.jobs.CoreShare`)."""
    def on_log(step, rec):
        cores.rebalance()
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=step)
    return on_log


def log_trained_model(tracker, model_path: Path, dataset_dir: Path, index: dict, cores, register: bool) -> None:
    """The trained model as an MLflow model of the run (input example: the first test image,
    cropped to 64 px), registered under the experiment's name when ``register``; and the torch
    threads the training used."""
    if tracker is None:
        return
    from pipeline.data.dataset import read_image
    example = read_image(dataset_dir / index["test"][0]["image"])[:64, :64]
    tracker.set_tags({"torch_threads": ",".join(map(str, cores.used)) or "default"})
    tracker.log_model(model_path, example, tracker.experiment if register else None)


def add_init(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--init", type=Path, default=None,
                    help="weak-shot initialisation (pretrain stage); required when model.pretrained is weak_shot")


def load_init(path: Path, p: Params) -> dict | None:
    """The pretrain stage's weights when ``model.pretrained`` is ``weak_shot``, else None."""
    if p.model.pretrained != "weak_shot":
        return None
    if path is None:
        raise ValueError("model.pretrained is 'weak_shot': pass the pretrain stage's output with --init "
                         "(dvc.yaml does)")
    import torch
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"'{path}' is missing: run the pretrain stage first (dvc repro)") from None
    except Exception as e:
        raise ValueError(f"'{path}' is not a weak-shot initialisation file the pretrain stage wrote: {e}") from None
    if not isinstance(ck, dict) or not ck.get("used"):
        raise ValueError(f"'{path}' was written while model.pretrained was not weak_shot: re-run the pretrain "
                         "stage (dvc repro)")
    return ck


def diagnostics_hook(p: Params, split: dict):
    """The training loop's similarity diagnostics (train.diagnostics_interval; 0 = none)."""
    if not p.train.diagnostics_interval:
        return None
    import torch

    from pipeline.engine.diagnostics import similarity_diagnostics
    return similarity_diagnostics(torch.tensor(split["base"]), torch.tensor(split["novel"]), p.base.seed,
                                  p.train.diagnostics_interval, p.loss.oracle)
