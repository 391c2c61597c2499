"""The device a command runs on (``train.device`` / ``eval.device`` / predict's ``--device``)."""
from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto``: CUDA when available, else the CPU; ``cuda`` without a GPU is an error naming ``key``
    (the params key or option the name came from)."""
    if name not in DEVICES:
        raise ValueError(f"{key} {name!r}: expected one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key} is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
