"""Checkpoints: written atomically, loaded with ``weights_only=True`` (no pickled code)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..io import atomic_path


def save_checkpoint(path: str | Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, unsafe pickle
        raise ValueError(f"checkpoint '{path}' cannot be loaded safely: {e}") from e
