"""Datasets: the embedded synthetic generator, class tables / official splits, split index.

``synthetic`` generates the procedurally drawn dataset, ``catalog`` looks up class tables
and the official weak-shot splits (``splits.json`` / ``classes.json`` beside this file),
``splits`` scans a prepared dataset folder into ``split.json`` + ``index.json``.
"""

IGNORE = 255    # the label of ignored pixels (unlabelled, padding) in every label map
