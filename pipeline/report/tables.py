"""Markdown tables of the report.

Tables are formatted by hand (not ``DataFrame.to_markdown``) so that the report does not
depend on ``tabulate``, which is not in requirements.txt. Numbers are percentages with one
decimal; a missing value (NaN or ``None``, e.g. a class absent from prediction and ground
truth) prints as ``n/a``.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

# (key in the metrics dict, column header)
METRIC_COLUMNS = (
    ("mIoU", "mIoU"),
    ("mIoU_base", "mIoU base"),
    ("mIoU_novel", "mIoU novel"),
    ("hIoU", "hIoU"),
    ("pAcc", "pAcc"),
    ("mAcc", "mAcc"),
    ("fwIoU", "fwIoU"),
)

PER_CLASS_COLUMNS = ("id", "name", "split", "iou", "acc", "gt_pixels", "pred_pixels")

# Published fully supervised MaskFormer R50 figures (SIMFORMER.md, "Reference figures"):
# the upper bound for every weak-shot split, quoted, never reproduced here.
REFERENCE_BOUNDS: dict[str, dict[str, Any]] = {
    "ade20k": {"label": "ADE20K-150", "mIoU": 44.5,
               "setting": "160k iterations, batch 16, crop 512"},
    "coco_stuff_10k": {"label": "COCO-Stuff-10K", "mIoU": 37.1,
                       "setting": "60k iterations, batch 32, crop 640"},
}


def is_missing(v) -> bool:
    """True for None and NaN (values a table prints as n/a)."""
    if v is None:
        return True
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return False


def fmt_pct(v, digits: int = 1) -> str:
    return "n/a" if is_missing(v) else f"{float(v):.{digits}f}"


def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def format_class_list(names: Iterable[Any]) -> str:
    """Class names joined so that the list stays unambiguous: ``", "`` when no name holds a
    comma, else ``"; "`` (ADE20K names such as ``road, route`` do), else each name quoted."""
    names = [str(n) for n in names]
    if not names:
        return "none"
    if not any("," in n for n in names):
        return ", ".join(names)
    if not any(";" in n for n in names):
        return "; ".join(names)
    return ", ".join('"' + n.replace('"', '\\"') + '"' for n in names)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                   align: Sequence[str] | None = None) -> str:
    """GitHub markdown table; ``align`` entries are 'l' or 'r' (default: all left)."""
    headers = [_cell(h) for h in headers]
    align = list(align) if align is not None else ["l"] * len(headers)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c) for c in r) + " |")
    return "\n".join(lines) + "\n"


def metrics_table_markdown(metrics: Mapping[str, Any]) -> str:
    """One-row table: mIoU, mIoU base, mIoU novel, hIoU, pAcc, mAcc, fwIoU (percent, 1 decimal)."""
    headers = [h for _, h in METRIC_COLUMNS]
    row = [fmt_pct(metrics.get(k)) for k, _ in METRIC_COLUMNS]
    return markdown_table(headers, [row], ["r"] * len(headers))


def per_class_dataframe(per_class) -> pd.DataFrame:
    """``metrics['per_class']`` (list of dicts), a DataFrame or a metrics dict -> DataFrame with
    columns ``id, name, split, iou, acc, gt_pixels, pred_pixels`` (None -> NaN)."""
    if isinstance(per_class, Mapping) and "per_class" in per_class:
        per_class = per_class["per_class"]
    df = per_class.copy() if isinstance(per_class, pd.DataFrame) else pd.DataFrame(list(per_class))
    missing = [c for c in PER_CLASS_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"per-class table lacks columns {missing}; expected {list(PER_CLASS_COLUMNS)}")
    for c in ("iou", "acc"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df[list(PER_CLASS_COLUMNS) + [c for c in df.columns if c not in PER_CLASS_COLUMNS]]


def sort_per_class(per_class) -> pd.DataFrame:
    """Base classes first, then novel; within a split by IoU descending (absent classes last),
    ties by id."""
    df = per_class_dataframe(per_class)
    order = df["split"].map({"base": 0, "novel": 1}).fillna(2)
    key = pd.DataFrame({"_s": order, "_nan": df["iou"].isna(), "_iou": -df["iou"].fillna(0.0), "_id": df["id"]},
                       index=df.index)
    idx = key.sort_values(["_s", "_nan", "_iou", "_id"], kind="mergesort").index
    return df.loc[idx].reset_index(drop=True)


def per_class_table_markdown(per_class_df) -> str:
    """Per-class table in the given row order: id, class, split, IoU, Acc, GT pixels, pred pixels."""
    df = per_class_dataframe(per_class_df)
    rows = [
        [int(r.id), r.name, r.split, fmt_pct(r.iou), fmt_pct(r.acc), f"{int(r.gt_pixels):,}", f"{int(r.pred_pixels):,}"]
        for r in df.itertuples(index=False)
    ]
    return markdown_table(["id", "class", "split", "IoU", "Acc", "GT pixels", "pred pixels"], rows,
                          ["r", "l", "l", "r", "r", "r", "r"])


def split_markdown(per_class_df) -> str:
    """The base and novel classes, by id, as two bullets."""
    df = per_class_dataframe(per_class_df)
    lines = []
    for split in ("base", "novel"):
        names = df.loc[df["split"] == split].sort_values("id")["name"].astype(str).tolist()
        lines.append(f"- {split} ({len(names)}): " + format_class_list(names))
    return "\n".join(lines) + "\n"


def reference_bound_markdown(dataset: str, metrics: Mapping[str, Any] | None = None) -> str:
    """The reference bound of a real dataset (no heading), or '' when none is published."""
    ref = REFERENCE_BOUNDS.get(str(dataset))
    if ref is None:
        return ""
    lines = [
        f"Published fully supervised MaskFormer R50 on {ref['label']}: **{ref['mIoU']:.1f} mIoU** "
        f"({ref['setting']}; MaskFormer paper, quoted in SimFormer as the upper bound of every split).",
        "This is the **reference upper bound, not a reproduction**: it was not run by this pipeline, "
        "and it uses full pixel labels for every class.",
    ]
    if metrics is not None and not is_missing(metrics.get("mIoU")):
        lines.append(f"This run (weak-shot, this pipeline's settings): {fmt_pct(metrics['mIoU'])} mIoU.")
    return "\n".join(lines) + "\n"
