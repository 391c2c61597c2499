"""Report building: markdown tables, matplotlib figures and ``reports/report.md``.

No torch, no MLflow: pandas + matplotlib (Agg canvas, no pyplot global state) only.
"""
from .figures import plot_per_class_iou, plot_training_curve
from .tables import (
    REFERENCE_BOUNDS,
    metrics_table_markdown,
    per_class_dataframe,
    per_class_table_markdown,
    render_report,
    sort_per_class,
)

__all__ = [
    "REFERENCE_BOUNDS",
    "metrics_table_markdown",
    "per_class_dataframe",
    "per_class_table_markdown",
    "plot_per_class_iou",
    "plot_training_curve",
    "render_report",
    "sort_per_class",
]
