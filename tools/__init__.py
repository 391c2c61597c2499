"""Commands that are run by hand (not DVC stages): ``python -m tools.<name> --help``."""
