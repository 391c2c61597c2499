"""Helpers of the MLflow, predict and resume tests: a tiny params mapping, a tiny prepared dataset
built by the functions the download and prepare stages
call, and a stage run in-process (the exit status of ``python -m stages.<name>``)."""
from __future__ import annotations

from pathlib import Path

import yaml

from tests.helpers import ROOT, run_stage, write_params  # noqa: F401  (re-exported)

TINY = {
    "base": {"seed": 3},
    "data": {"crop_size": 64, "scale_min": 0.5, "scale_max": 1.5, "prepare_workers": 1,
             "synthetic": {"num_train": 16, "num_test": 4, "image_size": 64}},
    "model": {"pretrained": "none", "hidden_dim": 32, "num_queries": 8, "nheads": 2, "dec_layers": 2,
              "dim_feedforward": 64, "conv_dim": 32, "mask_dim": 32, "gn_groups": 8},
    "loss": {"sim_points": 10, "sim_base_points": 8, "pp_points": 10},
    "train": {"iterations": 4, "batch_size": 4, "checkpoint_interval": 2, "log_interval": 1, "threads": 1,
              "device": "cpu", "freeze": "none", "warmup": 0, "diagnostics_interval": 0},
    "eval": {"device": "cpu"},
    "pseudo": {"enabled": False},
}


def tiny_params(**groups) -> dict:
    """params.yaml with the tiny overrides (64 px images, a tiny model, 4 CPU steps) and ``groups``
    merged in (``train={"iterations": 6}``); the ablation grid keeps its variants (``full: {}``)."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    for over in (TINY, groups):
        for g, values in over.items():
            for k, v in values.items():
                if isinstance(v, dict) and isinstance(p[g].get(k), dict):
                    p[g][k].update(v)
                else:
                    p[g][k] = v
    return p


def make_tiny_data(root: Path) -> Path:
    """``root/dataset`` and ``root/split`` (the download and prepare stages' outputs)."""
    from pipeline.config import build_params
    from pipeline.data.splits import build_split, write_split
    from pipeline.data.synthetic import generate_dataset
    p = build_params(tiny_params())
    generate_dataset(root / "dataset", p.data.synthetic, p.base.seed, progress=False)
    split, index = build_split(root / "dataset", "synthetic", 1, progress=False)
    write_split(root / "split", split, index)
    return root
