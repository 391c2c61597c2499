"""Print a params preset as `-S key=value` flags for `dvc exp run` (not a DVC stage).

A preset is a YAML file of overrides on top of params.yaml (see presets/). The merged
params are validated first, so a preset with a typo fails here, naming the key:

  dvc exp run $(python -m tools.preset presets/paper-coco_stuff_10k.yaml)
  dvc exp run $(python -m tools.preset presets/paper-ade20k.yaml) -S data.split=3
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from pipeline.cli import run


def flags(overrides: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in overrides.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out += flags(v, key)
        else:
            value = json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict, bool)) or v is None else v
            out += ["-S", f"{key}={value}"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", type=Path, help="preset YAML (overrides)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="base params file")
    args = ap.parse_args()
    from pipeline.ablation import _merge, check_variants
    from pipeline.config import ConfigError, build_ablation, build_params
    try:
        overrides = yaml.safe_load(args.preset.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"preset '{args.preset}' does not exist (see presets/)") from None
    if not isinstance(overrides, dict):
        raise ConfigError(f"preset '{args.preset}': expected a mapping of params groups")
    base = yaml.safe_load(args.params.read_text()) or {}
    merged = _merge(base, overrides, "")
    build_params(merged)
    check_variants(merged, build_ablation(merged.get("ablation")))
    # Unquoted on purpose: the output is meant for $(...) word splitting; values hold no spaces.
    print(" ".join(flags(overrides)))


if __name__ == "__main__":
    run(main)
