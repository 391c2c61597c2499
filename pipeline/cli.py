"""What every command (the DVC stages in ``stages/``, the tools in ``tools/``) shares: an argument
parser with ``--params``, loading the params file the command was given, and clean failures.

A command fails before any work when its params file is invalid, printing one line that names
the file or the key and what was expected, and exits with status 2 (1 for errors during the
work, 130 on Ctrl-C / SIGTERM). Nothing here parses ``sys.argv`` or opens ``params.yaml`` by
itself: the command parses its arguments and passes the path in.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

from .config import AblationConfig, ConfigError, Params, build_ablation, build_params

DEBUG_ENV = "SIMFORMER_DEBUG"      # set (or --debug): print the traceback of a failure


class _Debug(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        os.environ[DEBUG_ENV] = "1"


def parser(description: str, epilog: str = "") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", type=Path, help="params file (default: params.yaml)")
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ap.add_argument("--debug", action=_Debug, help=f"print the traceback of a failure (or set {DEBUG_ENV}=1)")
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


def add_init(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--init", type=Path, default=None,
                    help="weak-shot initialisation (pretrain stage); required when model.pretrained is weak_shot")


def read_params_file(path: Path) -> tuple[dict, str]:
    """The parsed mapping and the text of the params file at ``path`` (errors name the file)."""
    import yaml
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read params file '{path}': {e.strerror}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"params file '{path}' is not valid YAML: {_yaml_problem(e)}") from e
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"params file '{path}': expected a mapping of params groups at the top level")
    return raw or {}, text


def _yaml_problem(e) -> str:
    """``line L, column C: <problem> (<context> at line L', column C')`` of a YAML error: where in
    the params file, without the parser's ``in "<unicode string>"``."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or not problem:
        return str(e).replace(' in "<unicode string>"', "")
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if ctx:
        text += f" ({ctx}" + (f" at line {cmark.line + 1}, column {cmark.column + 1})" if cmark else ")")
    return text


def load_params(path: Path) -> tuple[Params, str]:
    """Validated params and the file's text (logged whole to MLflow)."""
    p, text, _, _ = load_params_raw(path)
    return p, text


def load_params_raw(path: Path) -> tuple[Params, str, dict, AblationConfig | None]:
    """Validated params, the file's text, the parsed mapping and the ablation grid (None when the
    file has no ``ablation`` group). Every group is validated here, before any work: the typed
    groups and the grid, including every variant's overrides."""
    raw, text = read_params_file(path)
    try:
        params, grid = validate_params(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return params, text, raw, grid


def validate_params(raw: dict) -> tuple[Params, AblationConfig | None]:
    """The typed params and the ablation grid (None without an ``ablation`` group) of a parsed params
    mapping, every group validated (the grid with every variant's overrides); a ConfigError names the key."""
    from .ablation import check_variants
    params = build_params(raw)
    grid = build_ablation(raw["ablation"]) if "ablation" in raw else None
    if grid is not None:
        check_variants(raw, grid)
    return params, grid


def _terminate(signum, frame):
    # SIGTERM (a scheduler's pre-emption) unwinds like Ctrl-C: MLflow runs are marked KILLED
    # (resumable) and no output is half-written (every write is atomic).
    raise KeyboardInterrupt(f"signal {signum}")


def run(main: Callable[[], None]) -> None:
    """Run a command's main, turning expected failures into one clear line and a non-zero exit."""
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
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
