"""Training loop, checkpoints and evaluation."""
