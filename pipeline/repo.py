"""The repository a run belongs to: its root (where the MLflow store lives) and its git commit."""
import os
import subprocess
from pathlib import Path


def _git(root, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def git_commit(root) -> str:
    """``git rev-parse HEAD`` at ``root``; ``"unknown"`` outside a repository or without git."""
    return _git(root, "rev-parse", "HEAD") or "unknown"


def store_root(cwd=None) -> Path:
    """The repository root, absolute: ``$DVC_ROOT`` if set (DVC sets it also for ``dvc exp run --temp``
    and queued runs, which run in ``.dvc/tmp/exps/``), else the git top level of ``cwd``, else ``cwd``."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    root = os.environ.get("DVC_ROOT", "").strip() or _git(cwd, "rev-parse", "--show-toplevel") or cwd
    return Path(root).expanduser().resolve()


def dvc_out(path, cwd=None) -> dict | None:
    """The ``dvc.lock`` entry of the output ``path`` (``{"stage", "path", "md5", "size", "nfiles"}``)
    in the repository the command runs in (``cwd``: DVC runs every stage from the folder of
    ``dvc.yaml``); None when there is no lock file or no such output in it (a run outside DVC)."""
    import yaml
    cwd = Path.cwd() if cwd is None else Path(cwd)
    lock = cwd / "dvc.lock"
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return None
    target = Path(os.path.normpath(os.path.relpath(Path(path).absolute(), cwd.absolute())))
    for stage, entry in stages.items():
        for out in (entry or {}).get("outs") or []:
            if Path(os.path.normpath(str(out.get("path", "")))) == target and out.get("md5"):
                return {"stage": stage, "path": str(out["path"]), "md5": str(out["md5"]),
                        "size": out.get("size"), "nfiles": out.get("nfiles")}
    return None


def git_dirty(root) -> bool | None:
    """Whether tracked files at ``root`` differ from ``HEAD`` (untracked files aside); None outside a
    repository or without git."""
    if _git(root, "rev-parse", "HEAD") == "":
        return None
    return bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
