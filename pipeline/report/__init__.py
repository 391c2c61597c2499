"""The report: markdown tables, matplotlib figures, the HTML page, and their assembly
(:mod:`pipeline.report.build`). No MLflow; torch only in the qualitative figure, imported on use.
"""
from .build import Grid, Inputs, Section, sections, write_report
from .figures import plot_per_class_iou, plot_training_curve
from .tables import (
    REFERENCE_BOUNDS,
    metrics_table_markdown,
    per_class_dataframe,
    per_class_table_markdown,
    sort_per_class,
    split_markdown,
)

__all__ = [
    "REFERENCE_BOUNDS",
    "Grid",
    "Inputs",
    "Section",
    "metrics_table_markdown",
    "per_class_dataframe",
    "per_class_table_markdown",
    "plot_per_class_iou",
    "plot_training_curve",
    "sections",
    "sort_per_class",
    "split_markdown",
    "write_report",
]
