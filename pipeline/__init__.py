"""SimFormer pipeline library: weak-shot semantic segmentation via dual similarity transfer.

Pure and importable: nothing here reads params.yaml or argv. ``stages/`` are the
command-line entry points that call it.
"""
__version__ = "0.1.0"
