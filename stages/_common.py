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


def load_params(path: Path) -> tuple[Params, str]:
    """Validated params and the file's text (logged whole to MLflow)."""
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
    return build_params(raw), text


def run(main: Callable[[], None]) -> None:
    """Run a stage's main, turning expected failures into one clear line and a non-zero exit."""
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
