"""Commands run by hand, not DVC stages: ``python -m tools.<name> --help`` (predict, benchmark, compare, preset)."""
