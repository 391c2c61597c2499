"""Checkpoints: :class:`TrainState` (what a resumed run needs to continue exactly), written
atomically and loaded with ``weights_only=True`` (no pickled code)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import atomic_path


@dataclass
class TrainState:
    """Model, criterion (SimNet and its statistics), optimizer, scheduler, the number of steps
    done and the logged curve; :meth:`state_dict` adds the RNG states of this process."""
    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    history: list[dict] = field(default_factory=list)

    def _cuda(self) -> bool:
        return next(self.model.parameters()).device.type == "cuda"

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "criterion": self.criterion.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step, "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if self._cuda() else None, "history": self.history}

    def load_state_dict(self, ck: dict) -> None:
        self.model.load_state_dict(ck["model"])
        self.criterion.load_state_dict(ck["criterion"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng_cpu"])
        if self._cuda() and ck.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ck["rng_cuda"])
        self.step, self.history = int(ck["step"]), list(ck["history"])

    def save(self, path: str | Path, **meta) -> None:
        """The state and ``meta`` (params, params hash, ...) to ``path``, atomically."""
        save_checkpoint(path, {**self.state_dict(), **meta})


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


def checkpoint_step(path: str | Path, phash: str) -> int:
    """The step of the checkpoint at ``path`` when it holds the params with hash ``phash``; -1 when
    there is no file, it cannot be loaded (training could not resume from it either) or it holds
    other params. The one reader behind "is this training done / how far is it"."""
    path = Path(path)
    if not path.is_file():
        return -1
    try:
        ck = load_checkpoint(path)
    except ValueError:
        return -1
    return int(ck.get("step", -1)) if ck.get("params_hash") == phash else -1
