"""Report figures (PNG). Uses ``matplotlib.figure.Figure`` with the Agg canvas directly, so no
pyplot global state or GUI backend is touched; every file is written through ``atomic_path``."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..io import atomic_path
from .tables import per_class_dataframe, sort_per_class

BASE_COLOR = "#4C72B0"
NOVEL_COLOR = "#DD8452"


def loss_terms(df: pd.DataFrame) -> list[str]:
    """The per-term loss columns of a training curve (``loss_<term>``, numeric, with a value). Not
    the total, and not what the curve also logs beside the losses (``lr``, ``seconds``, the
    diagnostics ``grad_*``, ``auc_*``, ``novel_pairs``): on one axis those would dwarf the losses.
    A term the params turned off is a blank column of the curve and is left out."""
    return [c for c in df.columns if str(c).startswith("loss_") and pd.api.types.is_numeric_dtype(df[c])
            and df[c].notna().any()]


def _new_figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_png) -> Path:
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


def _read_curve(curve) -> pd.DataFrame:
    if isinstance(curve, pd.DataFrame):
        return curve.copy()
    if isinstance(curve, (str, os.PathLike)):
        return pd.read_csv(curve)
    return pd.DataFrame(curve)


def _smooth(s: pd.Series, window: int) -> pd.Series:
    """Centred moving average over ``window`` logged points (fewer at the ends)."""
    return s.rolling(window=max(1, int(window)), center=True, min_periods=1).mean()


def smoothing_label(steps, window: int) -> str:
    """What :func:`_smooth` averages, in logged points and in training steps."""
    steps = pd.to_numeric(pd.Series(steps), errors="coerce").dropna()
    gap = float(steps.diff().median()) if len(steps) > 1 else 1.0
    window = max(1, int(window))
    return f"centred moving average over {window} logged points ({window * gap:g} steps)"


def _axis_max(values, cap: float = 100.0) -> float:
    """An upper axis limit just above the largest value (percent: at most ``cap``)."""
    v = np.asarray(values, dtype=float)
    top = float(np.nanmax(v)) if np.isfinite(v).any() else 0.0
    return min(cap, max(1.0, top * 1.1))


def plot_training_curve(curve_csv_or_df, out_png, smoothing: int = 10) -> Path:
    """Two panels: total loss (raw, faint, plus a centred moving average over ``smoothing``
    logged points) and every per-term loss column (:func:`loss_terms`, the same average)."""
    df = _read_curve(curve_csv_or_df)
    fig = _new_figure(11, 4.2)
    ax_total, ax_terms = fig.subplots(1, 2)
    if df.empty or "loss" not in df.columns:
        for ax in (ax_total, ax_terms):
            ax.text(0.5, 0.5, "no training curve data", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        return _save(fig, out_png)

    x = df["step"] if "step" in df.columns else pd.Series(np.arange(len(df)), index=df.index)
    loss = pd.to_numeric(df["loss"], errors="coerce")
    ax_total.plot(x, loss, color="0.3", alpha=0.25, linewidth=0.8, label="raw")
    label = smoothing_label(x, smoothing)
    ax_total.plot(x, _smooth(loss, smoothing), color="C0", linewidth=1.6, label="smoothed")
    ax_total.set_title("total loss (weighted sum)")
    ax_total.set_xlabel("step")
    ax_total.set_ylabel("loss")
    ax_total.grid(alpha=0.3)
    ax_total.legend(fontsize=8)

    terms = loss_terms(df)
    if terms:
        for i, c in enumerate(terms):
            ax_terms.plot(x, _smooth(pd.to_numeric(df[c], errors="coerce"), smoothing), color=f"C{i % 10}",
                          linewidth=1.3, label=c)
        ax_terms.legend(fontsize=8, ncol=2)
    else:
        ax_terms.text(0.5, 0.5, "no per-term losses logged", ha="center", va="center", transform=ax_terms.transAxes)
    ax_terms.set_title("loss terms (unweighted, smoothed)")
    ax_terms.set_xlabel("step")
    ax_terms.set_ylabel("unweighted loss")
    ax_terms.grid(alpha=0.3)
    fig.suptitle("smoothed: " + label, fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


def confusion_figure(conf, class_names, novel_ids=()) -> Figure:
    """The K x K confusion matrix (rows: actual class) as a heatmap, each row normalised to the
    percent of that class's labelled pixels (the diagonal is the class's recall); novel classes'
    tick labels in bold orange; the colour bar is the legend."""
    conf = np.asarray(conf, dtype=np.float64)
    k = conf.shape[0]
    rows = conf.sum(axis=1, keepdims=True)
    pct = np.divide(100.0 * conf, rows, out=np.zeros_like(conf), where=rows > 0)
    side = min(24.0, max(5.0, 0.22 * k + 2.5))
    fig = _new_figure(side + 1.2, side)
    ax = fig.subplots()
    im = ax.imshow(pct, cmap="viridis", vmin=0, vmax=100, interpolation="nearest")
    names = [str(n) for n in class_names][:k] + [str(i) for i in range(len(class_names), k)]
    novel = {int(i) for i in novel_ids}
    fs = 5 if k > 60 else 7 if k > 30 else 8
    ax.set_xticks(range(k))
    ax.set_xticklabels(names, rotation=90, fontsize=fs)
    ax.set_yticks(range(k))
    ax.set_yticklabels(names, fontsize=fs)
    for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
        for i, t in enumerate(ticks):
            if i in novel:
                t.set_color(NOVEL_COLOR)
                t.set_fontweight("bold")
    ax.set_xlabel("predicted class (novel in orange)")
    ax.set_ylabel("actual class (novel in orange)")
    ax.set_title("confusion matrix\n(% of each actual class's pixels)")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    bar.set_label("% of the actual class's pixels")
    fig.tight_layout()
    return fig


def plot_confusion(conf, class_names, out_png, novel_ids=()) -> Path:
    """:func:`confusion_figure` written to ``out_png``."""
    return _save(confusion_figure(conf, class_names, novel_ids), out_png)


def plot_per_class_iou(per_class_df, out_png) -> Path:
    """Horizontal IoU bars, base classes then novel (each by IoU), novel classes highlighted,
    dashed lines at the base and novel mean IoU; absent classes are listed with no bar."""
    df = sort_per_class(per_class_dataframe(per_class_df))
    n = len(df)
    fig = _new_figure(8, max(3.0, 0.2 * n + 1.4))
    ax = fig.subplots()
    if n == 0:
        ax.text(0.5, 0.5, "no classes", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, out_png)
    y = np.arange(n)
    iou = df["iou"].to_numpy(dtype=float)
    novel = (df["split"] == "novel").to_numpy()
    colors = [NOVEL_COLOR if v else BASE_COLOR for v in novel]
    ax.barh(y, np.nan_to_num(iou, nan=0.0), color=colors, height=0.8)
    labels = [f"{name} (absent)" if np.isnan(v) else str(name) for name, v in zip(df["name"], iou)]
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7 if n > 40 else 8)
    for tick, is_novel in zip(ax.get_yticklabels(), novel):
        if is_novel:
            tick.set_color(NOVEL_COLOR)
            tick.set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlim(0, _axis_max(iou))
    ax.set_xlabel("IoU (%)")
    ax.set_ylabel("class (novel in orange)")
    ax.grid(axis="x", alpha=0.3)
    from matplotlib.patches import Patch

    handles = []
    for split, color in (("base", BASE_COLOR), ("novel", NOVEL_COLOR)):
        vals = iou[(df["split"] == split).to_numpy()]
        vals = vals[~np.isnan(vals)]
        if vals.size:
            ax.axvline(vals.mean(), color=color, linestyle="--", linewidth=1)
            handles.append(Patch(color=color, label=f"{split} (mean {vals.mean():.1f})"))
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.set_title("per-class IoU")
    fig.tight_layout()
    return _save(fig, out_png)
