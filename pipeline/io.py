"""Atomic file output: write to a temporary name in the same folder, then rename.

A crash at any moment leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary name keeps the final suffix so that writers which choose a format from
    the extension (``cv2.imwrite``, ``savefig``) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix if suffix is not None else ".tmp" + path.suffix,
                               dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())          # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name; on success replace ``path`` with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the previous folder back under its name
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files that ``atomic_path(path)`` left behind when its process was killed
    (SIGKILL skips the clean-up); returns what was removed. Only ever touches ``.<name>.*.tmp*``."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = [q for q in path.parent.glob(f".{path.name}.*.tmp*") if q.is_file()]
    for q in stale:
        with contextlib.suppress(FileNotFoundError):
            q.unlink()
    return stale



# ----------------------------------------------------------------------------- stage inputs and outputs

def read_json(path: str | os.PathLike) -> dict:
    """A JSON input of a stage, with an error naming the file and the stage that makes it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"'{path}' is missing: run the stage that produces it first (dvc repro)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"'{path}' is not valid JSON: {e}") from None


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Records as a CSV table (a training curve, per-class IoU), written atomically."""
    import pandas as pd
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


def write_npy(path: str | os.PathLike, array) -> None:
    import numpy as np
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def write_eval_outputs(metrics_path: str | os.PathLike, per_class_path: str | os.PathLike, summary: dict,
                       per_class: list[dict]) -> dict:
    """The metrics (``SUMMARY_KEYS`` only: ``dvc metrics show`` lists nothing else) and the
    per-class table; returns the evaluation's other facts (dataset, split, class and pixel
    counts) for MLflow tags and cell.json."""
    from .engine.metrics import SUMMARY_KEYS, metrics_to_json
    write_json(metrics_path, metrics_to_json({k: summary[k] for k in SUMMARY_KEYS}))
    write_csv(per_class_path, per_class)
    return {k: v for k, v in summary.items() if k not in SUMMARY_KEYS}
