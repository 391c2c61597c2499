"""What the grid's numbers are worth: trivial baselines beside the models, paired differences
over seeds with confidence intervals, the DistLoss weight sweep and the similarity
diagnostics logged during training.

Inputs are plain tables: ``cells`` is :func:`pipeline.report.ablation.load_cells`' frame (one
row per cell: ``variant, seed``, the summary metrics, ``cell_dir`` holding ``curve.csv``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..io import atomic_path  # noqa: E402
from .stats import paired_difference  # noqa: E402

# (a, b): "a - b"; the comparisons the issue tracker and the paper care about
COMPARISONS = (("full", "baseline"), ("full", "+complementary"), ("oracle", "full"), ("+complementary", "baseline"))
PAIRED_METRICS = (("mIoU_novel", "novel mIoU"), ("mIoU_base", "base mIoU"), ("hIoU", "hIoU"))
BASELINE_COLUMNS = (("mIoU", "mIoU"), ("mIoU_base", "base"), ("mIoU_novel", "novel"), ("hIoU", "hIoU"),
                    ("pAcc", "pAcc"))


def _f(v, digits: int = 1) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


# ----------------------------------------------------------------------------- trivial baselines
def baselines_markdown(baselines: Mapping, models: Mapping[str, Mapping]) -> str:
    """The models (name -> metrics) beside the majority and nearest-mean-colour baselines."""
    rows = list(models.items()) + [("majority class (trivial)", baselines["majority"]),
                                   ("nearest mean colour (trivial, fitted with all classes)",
                                    baselines["nearest_colour"])]
    head = "| | " + " | ".join(h for _, h in BASELINE_COLUMNS) + " |\n|---|" + "---|" * len(BASELINE_COLUMNS) + "\n"
    body = "".join(f"| {name} | " + " | ".join(_f(m.get(k)) for k, _ in BASELINE_COLUMNS) + " |\n"
                   for name, m in rows)
    fit = baselines.get("fit", {})
    return (head + body + f"\nThe trivial baselines are fitted on {fit.get('train_images', '?')} training images "
            f"(pixel labels of every class, novel included) and scored on the {fit.get('test_images', '?')} test "
            "images like the models.\n")


CONVERGED_PACC = 80.0       # the benchmark's convergence target: pixel accuracy (percent) ...
CONVERGED_MIOU_RATIO = 2.0  # ... and mIoU of at least this multiple of the nearest-mean-colour baseline's


def quick_look_banner(metrics: Mapping, baselines: Mapping) -> str:
    """A warning unless the main model meets the convergence target (pixel accuracy >= 80% and
    mIoU >= 2x the nearest-mean-colour baseline's): below the colour baseline it has not
    converged at all; above it but short of the target, every number is still a quick look."""
    nc = baselines["nearest_colour"]
    have = [k for k in ("mIoU", "pAcc") if metrics.get(k) is not None and nc.get(k) is not None]
    worse = [k for k in have if metrics[k] < nc[k]]
    if worse:
        return ("> **Quick look, not a result:** the main model is below the nearest-mean-colour baseline on "
                + " and ".join(f"{k} ({_f(metrics[k])} < {_f(nc[k])})" for k in worse)
                + ". It has not converged; differences between variants describe this training budget only.\n\n")
    if len(have) < 2:
        return ""
    target = CONVERGED_MIOU_RATIO * nc["mIoU"]
    if metrics["pAcc"] >= CONVERGED_PACC and metrics["mIoU"] >= target:
        return ""
    return (f"> **Quick look:** the main model beats the trivial baselines but misses the convergence target "
            f"(pixel accuracy >= {CONVERGED_PACC:.0f}% and mIoU >= {CONVERGED_MIOU_RATIO:.0f}x the "
            f"nearest-colour baseline's, {_f(target)}): pAcc {_f(metrics['pAcc'])}, mIoU {_f(metrics['mIoU'])}. "
            "Differences between variants describe this training budget; see the training curves.\n\n")


# ----------------------------------------------------------------------------- paired differences
def paired_table(cells: pd.DataFrame, comparisons=COMPARISONS, metrics=PAIRED_METRICS,
                 confidence: float = 0.95) -> pd.DataFrame:
    """One row per (comparison, metric) whose two variants are in ``cells``: ``a, b, metric, n,
    mean, ci_low, ci_high, p_value, seeds``; pairs are cells of the same seed."""
    rows = []
    have = set(cells["variant"])
    for a, b in comparisons:
        if a not in have or b not in have:
            continue
        for key, label in metrics:
            va = dict(zip(cells.loc[cells["variant"] == a, "seed"], cells.loc[cells["variant"] == a, key]))
            vb = dict(zip(cells.loc[cells["variant"] == b, "seed"], cells.loc[cells["variant"] == b, key]))
            d = paired_difference(va, vb, confidence)
            rows.append({"a": a, "b": b, "metric": label, **d})
    return pd.DataFrame(rows)


def paired_markdown(table: pd.DataFrame, confidence: float = 0.95) -> str:
    if table.empty:
        return "No two variants of the comparisons share a seed.\n"
    lines = [f"| difference | metric | seeds (pairs) | mean | {int(confidence * 100)}% CI | p (paired t) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        if r.n < 2:
            verdict = "one pair: no interval"
        elif r.ci_low > 0:
            verdict = "a > b"
        elif r.ci_high < 0:
            verdict = "a < b"
        else:
            verdict = "not resolved (CI spans 0)"
        lines.append(f"| {r.a} − {r.b} | {r.metric} | {r.n} | {_f(r.mean)} | [{_f(r.ci_low)}, {_f(r.ci_high)}] | "
                     f"{_f(r.p_value, 3)} | {verdict} |")
    return ("Paired over seeds: the cells of one seed share the data order, the augmentations and the "
            "initialisation, so the per-seed difference removes the seed's own luck. Student t interval with n − 1 "
            "degrees of freedom.\n\n" + "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- pp_weight sweep
def sweep_frame(cells: pd.DataFrame, pp_weight: Mapping[str, float]) -> pd.DataFrame:
    """Novel / base mIoU per DistLoss weight: ``pp_weight, variant, n, novel_mean, novel_std,
    base_mean, base_std``. ``pp_weight`` maps the sweep's variants to their weight."""
    rows = []
    for v, w in sorted(pp_weight.items(), key=lambda kv: kv[1]):
        sub = cells.loc[cells["variant"] == v]
        if sub.empty:
            continue
        rows.append({"pp_weight": float(w), "variant": v, "n": int(len(sub)),
                     "novel_mean": float(sub["mIoU_novel"].mean()), "novel_std": float(sub["mIoU_novel"].std(ddof=1)),
                     "base_mean": float(sub["mIoU_base"].mean()), "base_std": float(sub["mIoU_base"].std(ddof=1))})
    return pd.DataFrame(rows)


def plot_sweep(sweep: pd.DataFrame, out_png) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = range(len(sweep))
    for key, label, colour in (("novel", "novel mIoU", "tab:red"), ("base", "base mIoU", "tab:blue")):
        ax.errorbar(list(x), sweep[f"{key}_mean"], yerr=sweep[f"{key}_std"].fillna(0), marker="o", capsize=4,
                    label=label, color=colour)
    ax.set_xticks(list(x), [f"{w:g}" for w in sweep["pp_weight"]])
    ax.set_xlabel("loss.pp_weight (DistLoss weight)")
    ax.set_ylabel("percent (mean ± std over seeds)")
    ax.set_title("novel and base mIoU against the DistLoss weight")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(out_png)


def sweep_markdown(sweep: pd.DataFrame) -> str:
    lines = ["| pp_weight | variant | seeds | novel mIoU | base mIoU |", "|---|---|---|---|---|"]
    for r in sweep.itertuples():
        lines.append(f"| {r.pp_weight:g} | {r.variant} | {r.n} | {_f(r.novel_mean)} ± {_f(r.novel_std)} | "
                     f"{_f(r.base_mean)} ± {_f(r.base_std)} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- diagnostics
DIAGNOSTIC_COLUMNS = ("auc_simnet", "auc_student", "grad_ClsLoss", "grad_MaskLoss", "grad_CompLoss",
                      "grad_DistLoss")


def diagnostics_frame(cells: pd.DataFrame, variants: Sequence[str]) -> pd.DataFrame:
    """The diagnostics rows of the cells' curves (steps where they were logged): ``variant,
    seed, step`` and the columns of :data:`DIAGNOSTIC_COLUMNS` present."""
    parts = []
    for r in cells.itertuples():
        if r.variant not in variants:
            continue
        path = Path(r.cell_dir) / "curve.csv"
        if not path.is_file():
            continue
        c = pd.read_csv(path)
        cols = [k for k in DIAGNOSTIC_COLUMNS if k in c.columns]
        if not cols:
            continue
        c = c.dropna(subset=cols, how="all")[["step", *cols]]
        parts.append(c.assign(variant=r.variant, seed=r.seed))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def diagnostics_markdown(diag: pd.DataFrame) -> str:
    """Per variant, the mean over seeds at the last logged step."""
    if diag.empty:
        return "No diagnostics were logged (train.diagnostics_interval: 0).\n"
    last = diag[diag["step"] == diag.groupby("variant")["step"].transform("max")]
    cols = [k for k in DIAGNOSTIC_COLUMNS if k in last.columns]
    means = last.groupby("variant", sort=False)[cols].mean()
    lines = ["| variant | step | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for v, r in means.iterrows():
        step = int(last.loc[last["variant"] == v, "step"].iloc[0])
        lines.append(f"| {v} | {step} | " + " | ".join(_f(r[k], 3) for k in cols) + " |")
    return ("Measured on the training batch of the logged step (ground truth used only to measure): AUC of "
            "SimNet's similarity and of the student's ReLU(cos) on pixel pairs of novel classes (1 = perfect "
            "ranking, 0.5 = chance), and each loss's weighted gradient norm on the pixel decoder (with "
            "`train.freeze: encoder`, on the trainable transformer decoder and heads instead; 0 when the loss reads "
            "detached features). DistLoss can teach the student only "
            "where SimNet's AUC exceeds the student's.\n\n" + "\n".join(lines) + "\n")


def plot_diagnostics(diag: pd.DataFrame, out_png) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for v, sub in diag.groupby("variant", sort=False):
        m = sub.groupby("step").mean(numeric_only=True)
        if "auc_student" in m and m["auc_student"].notna().any():
            ax.plot(m.index, m["auc_student"], marker=".", label=f"{v}: student")
        if "auc_simnet" in m and m["auc_simnet"].notna().any():
            ax.plot(m.index, m["auc_simnet"], linestyle="--", marker=".", label=f"{v}: SimNet")
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("AUC on novel pixel pairs")
    ax.set_title("similarity AUC on novel pixel pairs (0.5 = chance)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(out_png)


# ----------------------------------------------------------------------------- how long each run trained
def training_time_markdown(cells: pd.DataFrame, main_curve: pd.DataFrame | None = None) -> str:
    """Steps and wall time of the main model and of each variant's cells (the ``seconds`` of the
    last curve row: time in the process that finished the run), and the cells' torch threads
    (``cell.json``; cells that trained side by side each had fewer threads, so their times are
    not comparable with the main model's)."""
    def last(c: pd.DataFrame):
        if c is None or c.empty or "seconds" not in c:
            return None, None
        return int(c["step"].iloc[-1]), float(c["seconds"].iloc[-1])
    lines = ["| run | steps | torch threads | training time (s) |", "|---|---|---|---|"]
    s, t = last(main_curve)
    if s is not None:
        lines.append(f"| main model | {s} | (train stage) | {t:.0f} |")
    for v, sub in cells.groupby("variant", sort=False):
        times, steps, threads = [], set(), set()
        for _, row in sub.iterrows():
            path = Path(row["cell_dir"]) / "curve.csv"
            st, tt = last(pd.read_csv(path)) if path.is_file() else (None, None)
            if st is not None:
                steps.add(st)
                times.append(tt)
                if not row.get("shared_with_main") and pd.notna(row.get("torch_threads")):
                    threads.add(int(row["torch_threads"]))
        if times:
            lines.append(f"| {v} ({len(times)} cells) | {', '.join(map(str, sorted(steps)))} | "
                         f"{', '.join(map(str, sorted(threads))) or '–'} | "
                         f"{sum(times) / len(times):.0f} mean ({min(times):.0f}-{max(times):.0f}) |")
    return "\n".join(lines) + "\n"
