"""Run-only tools, not DVC stages: ``python -m tools.<name> --help`` (benchmark, compare, preset, ...)."""
