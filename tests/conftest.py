import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(autouse=True)
def _few_threads():
    import torch
    torch.set_num_threads(1)
    yield


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def file_params(overrides: dict | None = None) -> dict:
    """The params file's mapping (params.yaml sets every key: it is the only place a value
    lives) with ``overrides`` merged in, e.g. ``{"train": {"lr": 1e-3}}``."""
    import yaml
    return _merged(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides or {})
