"""The ablation report: variants x (splits x) seeds grid -> mean ± std tables, novel-class IoU, curves.

Input: a cells folder (``data/ablation/``) with one sub-folder per cell named
``<variant>-<seed>``, or ``<variant>-s<split>-<seed>`` for a cell on a split other than the
pipeline's ``data.split`` (:func:`pipeline.ablation.cell_key`), each holding

* ``cell.json``: ``{"variant", "seed", "params_hash", "shared_with_main", "iterations", "dataset",
  "split", ...}``
* ``metrics.json``: the evaluate stage's metrics (percent; a value may be ``null``)
* ``per_class_iou.csv``: ``id,name,split,iou,acc,gt_pixels,pred_pixels``
* ``curve.csv``: ``step,loss,<loss terms>...,lr,images_per_s``

Statistics: per variant the mean over its cells (its seeds; with several splits, pooled over
the splits and seeds) and the *sample* standard deviation (``ddof=1``); a variant with one seed
(or one non-missing value) has no std, printed as ``± n/a``. A seed whose metric is ``null``
(e.g. no novel class present) is left out of that metric's mean. The difference column is ``mean(variant) - mean(baseline)`` from unrounded
means; a difference no larger than the larger standard deviation of the two rows is *inside
the seed spread* and marked ``†``. No torch here: pandas + matplotlib (Agg canvas) only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ..engine.metrics import SUMMARY_KEYS
from .figures import _axis_max, _new_figure, _read_curve, _save, _smooth, loss_terms, smoothing_label
from .tables import PER_CLASS_COLUMNS, REFERENCE_BOUNDS, fmt_pct, is_missing, markdown_table

# (metric key, column header) of the ablation table, in the paper's order.
ABLATION_METRICS = (
    ("mIoU_base", "mIoU base"),
    ("mIoU_novel", "mIoU novel"),
    ("mIoU", "mIoU"),
    ("hIoU", "hIoU"),
)
INSIDE_SPREAD = "†"
CELL_FILES = ("cell.json", "metrics.json", "per_class_iou.csv", "curve.csv")


class AblationError(ValueError):
    """A cells folder that cannot be read; the message names the folder or file."""


# --------------------------------------------------------------------------- loading
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"ablation cell file missing: {path}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AblationError(f"ablation cell file {path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise AblationError(f"ablation cell file {path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _num(v, path: Path, key: str) -> float:
    if v is None:
        return float("nan")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise AblationError(f"ablation cell file {path}: '{key}' must be a number or null, got {v!r}")
    return float(v)


def _cell_dirs(cells_dir: Path) -> list[Path]:
    if not cells_dir.is_dir():
        raise FileNotFoundError(f"ablation cells folder missing: {cells_dir}")
    # Hidden folders are atomic_dir's temporaries / leftovers, never cells.
    dirs = sorted(p for p in cells_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise AblationError(f"ablation cells folder {cells_dir} holds no cell folders (<variant>-<seed>)")
    return dirs


def splits_of(cells_df: pd.DataFrame) -> list:
    """The distinct splits of a cells frame (its ``split`` column), sorted; [] without one."""
    if "split" not in cells_df:
        return []
    return sorted({s for s in cells_df["split"] if s is not None and s == s})


def pair_keys(cells_df: pd.DataFrame) -> list[tuple]:
    """Per row, what pairs cells of two variants: ``(split, seed)`` (``split`` None in a frame or a
    cell that does not say)."""
    splits = cells_df["split"] if "split" in cells_df else [None] * len(cells_df)
    return [(None if k is None or k != k else int(k), int(s)) for k, s in zip(splits, cells_df["seed"])]


def load_cells(cells_dir) -> pd.DataFrame:
    """One row per cell: ``variant, seed, params_hash, shared_with_main, iterations, torch_threads,
    dataset, split`` (from ``cell.json``; ``torch_threads`` None in cells written before it was recorded), the summary metrics (``mIoU, mIoU_base, mIoU_novel, hIoU, pAcc, mAcc, fwIoU``; null -> NaN),
    ``cell_dir`` and ``key`` (the folder's name). Rows are sorted by folder name.

    Raises ``FileNotFoundError`` naming the missing ``cell.json`` / ``metrics.json`` and
    ``AblationError`` naming the file for invalid JSON, a non-numeric metric, a missing
    summary key, or a folder whose name is neither ``<variant>-<seed>`` nor
    ``<variant>-s<split>-<seed>`` of its ``cell.json``.
    """
    cells_dir = Path(cells_dir)
    rows = []
    for d in _cell_dirs(cells_dir):
        cell_path, metrics_path = d / "cell.json", d / "metrics.json"
        cell = _read_json(cell_path)
        for k in ("variant", "seed"):
            if k not in cell:
                raise AblationError(f"ablation cell file {cell_path} lacks '{k}'")
        variant, seed = cell["variant"], cell["seed"]
        if not isinstance(variant, str) or not variant:
            raise AblationError(f"ablation cell file {cell_path}: 'variant' must be a non-empty string, got {variant!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise AblationError(f"ablation cell file {cell_path}: 'seed' must be an integer, got {seed!r}")
        split = cell.get("split")
        names = [f"{variant}-{seed}"] + ([f"{variant}-s{split}-{seed}"] if split is not None else [])
        if d.name not in names:
            raise AblationError(f"ablation cell folder {d} does not match its cell.json "
                                f"(variant {variant!r}, seed {seed}, split {split}): expected folder "
                                + " or ".join(f"'{n}'" for n in names))
        metrics = _read_json(metrics_path)
        missing = [k for k in SUMMARY_KEYS if k not in metrics]
        if missing:
            raise AblationError(f"ablation cell file {metrics_path} lacks metric(s) {missing}")
        row: dict[str, Any] = {
            "variant": variant, "seed": seed,
            "params_hash": cell.get("params_hash"), "shared_with_main": bool(cell.get("shared_with_main", False)),
            "iterations": cell.get("iterations"), "torch_threads": cell.get("torch_threads"),
            "dataset": cell.get("dataset"), "split": cell.get("split"),
        }
        for k in SUMMARY_KEYS:
            row[k] = _num(metrics[k], metrics_path, k)
        row["cell_dir"] = str(d)
        row["key"] = d.name
        rows.append(row)
    df = pd.DataFrame(rows)
    dup = df[df.duplicated(["key"], keep=False)]
    if not dup.empty:  # impossible with folder == key, kept as a guard
        raise AblationError(f"ablation cells folder {cells_dir} holds duplicate cells: {dup['cell_dir'].tolist()}")
    return df


def grid_cells(cells_dir, cells: Sequence[str | tuple[str, int]]) -> pd.DataFrame:
    """:func:`load_cells` restricted to the grid's cells - their keys (folder names, as
    :attr:`pipeline.ablation.Cell.key`) or ``(variant, seed)`` pairs - in that order;
    ``FileNotFoundError`` naming every cell missing from ``cells_dir``."""
    keys = [c if isinstance(c, str) else f"{c[0]}-{c[1]}" for c in cells]
    df = load_cells(cells_dir).set_index("key", drop=False)
    missing = [k for k in keys if k not in df.index]
    if missing:
        raise FileNotFoundError(f"ablation cells missing from '{cells_dir}': {', '.join(missing)} "
                                "(run `dvc repro` to train them)")
    return df.loc[keys].reset_index(drop=True)


def _variant_rows(cells_df: pd.DataFrame, variant: str) -> pd.DataFrame:
    sub = cells_df.loc[cells_df["variant"] == variant]
    return sub.sort_values(["split", "seed"] if len(splits_of(sub)) > 1 else "seed")


def _check_variants(cells_df: pd.DataFrame, variants: Sequence[str]) -> None:
    if not variants:
        raise AblationError("no ablation variants given")
    missing = [v for v in variants if v not in set(cells_df["variant"])]
    if missing:
        raise AblationError(f"no ablation cells for variant(s) {missing}; cells found for "
                            f"{sorted(set(cells_df['variant']))}")


# --------------------------------------------------------------------------- tables
def ablation_table(cells_df: pd.DataFrame, variants: Sequence[str], baseline: str = "baseline") -> pd.DataFrame:
    """Per variant (in ``variants`` order): ``variant, n, seeds, splits`` (a cell's seed and split,
    one entry per cell) and, for each of
    ``mIoU_base, mIoU_novel, mIoU, hIoU``: ``<m>_mean``, ``<m>_std`` (sample std, ddof=1; NaN
    with fewer than two values), ``<m>_n`` (seeds with a value) and ``<m>_diff`` (mean minus
    the baseline's mean; NaN when ``baseline`` has no cells, 0 for the baseline itself) and
    ``<m>_inside`` (True when ``|diff|`` is at most the larger std of the row and the baseline,
    None when a std is missing). ``is_baseline`` marks the baseline row. The baseline need not be in ``variants``; it is
    looked up in ``cells_df``. A variant with no cells raises ``AblationError``.
    """
    variants = list(variants)
    _check_variants(cells_df, variants)
    has_baseline = baseline in set(cells_df["variant"])
    base_means, base_stds = {}, {}
    if has_baseline:
        b = _variant_rows(cells_df, baseline)
        base_means = {k: b[k].astype(float).mean(skipna=True) for k, _ in ABLATION_METRICS}
        base_stds = {k: b[k].astype(float).std(ddof=1, skipna=True) for k, _ in ABLATION_METRICS}
    rows = []
    for v in variants:
        sub = _variant_rows(cells_df, v)
        row: dict[str, Any] = {"variant": v, "n": int(len(sub)), "seeds": [int(s) for s in sub["seed"]],
                               "splits": [k for k, _ in pair_keys(sub)],
                               "is_baseline": v == baseline}
        for k, _ in ABLATION_METRICS:
            vals = sub[k].astype(float)
            n_valid = int(vals.notna().sum())
            mean = float(vals.mean(skipna=True)) if n_valid else float("nan")
            std = float(vals.std(ddof=1, skipna=True)) if n_valid >= 2 else float("nan")
            row[f"{k}_mean"], row[f"{k}_std"], row[f"{k}_n"] = mean, std, n_valid
            row[f"{k}_diff"] = diff = mean - base_means[k] if has_baseline else float("nan")
            spread = max(std, base_stds.get(k, float("nan")))
            row[f"{k}_inside"] = None if is_missing(diff) or is_missing(spread) else bool(abs(diff) <= spread)
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs["baseline"] = baseline if has_baseline else None
    return out


def fmt_mean_std(mean, std, digits: int = 1) -> str:
    """``34.2 ± 1.3``; ``34.2 ± n/a`` without a std; ``n/a`` without a mean."""
    if is_missing(mean):
        return "n/a"
    return f"{float(mean):.{digits}f} ± {'n/a' if is_missing(std) else f'{float(std):.{digits}f}'}"


def fmt_diff(v, digits: int = 1) -> str:
    """Signed difference, ``+5.1`` / ``-2.0``; a value that rounds to zero prints ``+0.0``."""
    if is_missing(v):
        return "n/a"
    s = f"{float(v):+.{digits}f}"
    return "+" + s[1:] if float(s) == 0 else s


def _seeds_text(seeds) -> str:
    return ", ".join(str(int(s)) for s in seeds)


def _table_splits(table: pd.DataFrame) -> list:
    if "splits" not in table or not len(table):
        return []
    return sorted({k for ks in table["splits"] for k in ks if k is not None})


def _cells_text(seeds, splits) -> str:
    """A row's cells: its seeds, or per split its seeds (``s1: 6, 7; s2: 6, 7``)."""
    by: dict = {}
    for k, s in zip(splits, seeds):
        by.setdefault(k, []).append(s)
    return "; ".join(f"s{k}: {_seeds_text(ss)}" for k, ss in by.items())


def ablation_notes(table: pd.DataFrame, cell_iterations: int | None = None,
                   main_iterations: int | None = None) -> list[str]:
    """What the table's numbers are worth, one warning per line (markdown): cells trained for
    fewer iterations than the main model, differences inside the seed spread, one seed."""
    notes = []
    if cell_iterations and main_iterations and cell_iterations < main_iterations:
        notes.append(f"**A quick look, not a result.** Each grid cell trained {cell_iterations} iterations, the "
                     f"main model {main_iterations}: at this length the differences below say little. For "
                     "comparable numbers train the cells as long: `dvc exp run -S ablation.iterations=0`.")
    rows = [r for r in table.to_dict("records") if not r.get("is_baseline")]
    flags = [r[f"{k}_inside"] for r in rows for k, _ in ABLATION_METRICS if not is_missing(r[f"{k}_diff"])]
    if any(f is None for f in flags):
        notes.append("**One seed** (for a variant or the baseline): the seed spread is unknown, so no "
                     "difference can be told from seed noise. Add seeds: `dvc exp run -S 'ablation.seeds=[6,7,8]'`.")
    if any(f is True for f in flags):
        notes.append(f"**{sum(f is True for f in flags)} of {len(flags)} differences are inside the seed spread** "
                     f"(marked {INSIDE_SPREAD}: |Δ| is at most the larger standard deviation of the two rows); "
                     "they cannot be told from seed noise.")
    return notes


def ablation_markdown(table: pd.DataFrame, dataset: str | None = None, reference: Mapping[str, Any] | None = None,
                      notes: Sequence[str] = ()) -> str:
    """Markdown for an :func:`ablation_table` (no heading: the caller gives one).

    ``notes`` (:func:`ablation_notes`) come first, as quoted banners. One row per variant:
    seeds, then ``mean ± std`` of each metric followed by its difference to the baseline
    (``—`` on the baseline row; ``n/a`` without a baseline; ``†`` inside the seed spread). For
    a dataset with a published bound (``tables.REFERENCE_BOUNDS``: ade20k 44.5, coco_stuff_10k
    37.1 mIoU), or an explicit ``reference`` mapping (``label``, ``mIoU``, ``setting``), a
    separate "Reference bound" part quotes it, marked as published and not a project result.
    """
    multi = len(_table_splits(table)) > 1
    headers = ["variant", "split: seeds" if multi else "seeds"]
    align = ["l", "l"]
    for _, h in ABLATION_METRICS:
        headers += [h, "Δ"]
        align += ["r", "r"]
    rows = []
    for r in table.to_dict("records"):
        row = [f"**{r['variant']}**" if r.get("is_baseline") else r["variant"],
               _cells_text(r["seeds"], r["splits"]) if multi else _seeds_text(r["seeds"])]
        for k, _ in ABLATION_METRICS:
            row.append(fmt_mean_std(r[f"{k}_mean"], r[f"{k}_std"]))
            mark = INSIDE_SPREAD if r.get(f"{k}_inside") is True else ""
            row.append("—" if r.get("is_baseline") else fmt_diff(r[f"{k}_diff"]) + mark)
        rows.append(row)

    all_seeds = sorted({int(s) for seeds in table["seeds"] for s in seeds}) if len(table) else []
    ns = sorted({int(n) for n in table["n"]}) if len(table) else []
    baseline_rows = table.loc[table["is_baseline"]] if "is_baseline" in table else table.iloc[:0]
    baseline_name = baseline_rows["variant"].iloc[0] if len(baseline_rows) else table.attrs.get("baseline")
    lines = [f"> {n}\n" for n in notes]
    if dataset:
        lines.append(f"Dataset: `{dataset}`.")
    if multi:
        lines.append(f"Splits {_seeds_text(_table_splits(table))} × seeds {_seeds_text(all_seeds)} "
                     f"({' / '.join(str(n) for n in ns)} cells per variant). Percent; each cell is the mean over "
                     "the variant's cells, **pooled over splits and seeds**, ± their sample standard deviation "
                     "(ddof = 1), so the spread includes the differences between splits.")
    else:
        lines.append(f"Seeds used: {_seeds_text(all_seeds) if all_seeds else 'none'} "
                     f"({' / '.join(str(n) for n in ns) or 0} per variant). Percent; each cell is the mean over "
                     "seeds ± the sample standard deviation (ddof = 1; `n/a` with one seed).")
    if baseline_name is not None:
        lines.append(f"Δ = difference of the mean to the **{baseline_name}** mean (from unrounded means); "
                     f"{INSIDE_SPREAD} = inside the seed spread.")
    else:
        lines.append("Δ = difference of the mean to the baseline mean (`n/a`: no baseline cells).")
    parts = ["\n".join(lines) + "\n", markdown_table(headers, rows, align)]

    ref = dict(reference) if reference is not None else REFERENCE_BOUNDS.get(str(dataset)) if dataset else None
    if ref is not None and not is_missing(ref.get("mIoU")):
        label = ref.get("label", dataset or "this dataset")
        setting = ref.get("setting")
        ref_lines = [
            "### Reference bound (published, not a project result)",
            "",
            f"Fully supervised MaskFormer R50 on {label}, as published (MaskFormer paper, quoted in SimFormer as "
            f"the upper bound of every weak-shot split{'; ' + setting if setting else ''}). It was **not run by "
            "this pipeline** and uses full pixel labels for every class; it is not comparable to the rows above "
            "as a result, only as a ceiling.",
            "",
        ]
        ref_row = ["MaskFormer R50, fully supervised (published reference)", "—"]
        for k, _ in ABLATION_METRICS:
            ref_row += [fmt_pct(ref["mIoU"]) if k == "mIoU" else "—", "—"]
        parts.append("\n".join(ref_lines) + "\n" + markdown_table(headers, [ref_row], align))
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


def ablation_summary(table: pd.DataFrame) -> dict:
    """``{variant: {metric: {"mean", "std", "n"}}}`` of an :func:`ablation_table` (strict JSON:
    a missing value is None): ``reports/ablation.json``, DVC metrics."""
    def num(v):
        return None if is_missing(v) else round(float(v), 4)

    return {r["variant"]: {k: {"mean": num(r[f"{k}_mean"]), "std": num(r[f"{k}_std"]), "n": int(r[f"{k}_n"])}
                           for k, _ in ABLATION_METRICS} for r in table.to_dict("records")}


def _read_per_class(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"ablation cell file missing: {path}")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise AblationError(f"ablation cell file {path} is not a valid CSV: {e}") from None
    missing = [c for c in ("id", "name", "split", "iou") if c not in df.columns]
    if missing:
        raise AblationError(f"ablation cell file {path} lacks columns {missing}; expected {list(PER_CLASS_COLUMNS)}")
    df["iou"] = pd.to_numeric(df["iou"], errors="coerce").astype(float)
    return df


def novel_class_iou(cells_dir, variants: Sequence[str]) -> pd.DataFrame:
    """Per novel class (rows, by class id): ``id, name``, then one column per variant (in
    ``variants`` order) with its IoU averaged over the seeds where the class has an IoU (NaN
    when it has none in any seed). The novel classes are those marked ``novel`` in the cells'
    ``per_class_iou.csv``: over several splits, each class is averaged over the cells of the
    splits where it is novel."""
    variants = list(variants)
    cells = load_cells(cells_dir)
    _check_variants(cells, variants)
    frames = []
    for r in cells.loc[cells["variant"].isin(variants)].itertuples(index=False):
        pc = _read_per_class(Path(r.cell_dir) / "per_class_iou.csv")
        pc = pc.loc[pc["split"].astype(str) == "novel", ["id", "name", "iou"]].copy()
        pc["variant"] = r.variant
        pc["seed"] = r.seed
        frames.append(pc)
    long = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["id", "name", "iou", "variant"])
    names = long.drop_duplicates("id").set_index("id")["name"]
    wide = long.groupby(["id", "variant"])["iou"].mean().unstack("variant")
    wide = wide.reindex(columns=variants).sort_index()
    out = wide.reset_index()
    out.insert(1, "name", out["id"].map(names).astype(str))
    out.columns.name = None
    return out


def novel_class_markdown(df: pd.DataFrame) -> str:
    """Markdown table of :func:`novel_class_iou` (IoU percent, 1 decimal, ``n/a`` if absent)."""
    variants = [c for c in df.columns if c not in ("id", "name")]
    rows = [[int(r["id"]), r["name"]] + [fmt_pct(r[v]) for v in variants] for r in df.to_dict("records")]
    return markdown_table(["id", "novel class"] + variants, rows, ["r", "l"] + ["r"] * len(variants))


# --------------------------------------------------------------------------- figures
def plot_novel_class_iou(df: pd.DataFrame, out_png) -> Path:
    """Grouped horizontal bars: one group per novel class, one bar per variant (mean IoU over
    seeds). ``df`` is :func:`novel_class_iou`'s frame (``id, name, <variant>...``)."""
    variants = [c for c in df.columns if c not in ("id", "name")]
    n, m = len(df), max(1, len(variants))
    fig = _new_figure(8, max(3.0, n * (0.18 * m + 0.25) + 1.6))
    ax = fig.subplots()
    if n == 0 or not variants:
        ax.text(0.5, 0.5, "no novel classes", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, out_png)
    group = 0.8
    h = group / m
    y = np.arange(n)
    for i, v in enumerate(variants):
        vals = pd.to_numeric(df[v], errors="coerce").to_numpy(dtype=float)
        yy = y - group / 2 + (i + 0.5) * h
        ax.barh(yy, np.nan_to_num(vals, nan=0.0), height=h * 0.95, color=f"C{i % 10}", label=v)
        for yv in yy[np.isnan(vals)]:  # class absent from prediction and GT in every seed
            ax.text(0.01, yv, "n/a", va="center", ha="left", fontsize=8, color=f"C{i % 10}",
                    transform=ax.get_yaxis_transform())
    ax.set_yticks(y)
    ax.set_yticklabels([str(s) for s in df["name"]], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, _axis_max(df[variants].apply(pd.to_numeric, errors="coerce").to_numpy()))
    ax.set_xlabel("IoU (%) — mean over seeds")
    ax.set_ylabel("novel class")
    ax.set_title("novel-class IoU by variant")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, out_png)


def plot_variant_curves(cells_dir, variants: Sequence[str], out_png, smoothing: int = 10) -> Path:
    """The loss terms every variant trains with (the total sums different terms per variant,
    so it is not compared), one panel per term: per variant the mean over seeds of each seed's
    centred moving average, the seeds' min-max range shaded. Reads ``<cell>/curve.csv``."""
    variants = list(variants)
    cells = load_cells(cells_dir)
    _check_variants(cells, variants)
    curves: dict[str, list[pd.DataFrame]] = {}
    for v in variants:
        for r in _variant_rows(cells, v).itertuples(index=False):
            path = Path(r.cell_dir) / "curve.csv"
            if not path.is_file():
                raise FileNotFoundError(f"ablation cell file missing: {path}")
            df = _read_curve(path)
            if not df.empty and "step" in df.columns:
                curves.setdefault(v, []).append(df.drop_duplicates("step", keep="last").set_index("step"))
    frames = [df for dfs in curves.values() for df in dfs]
    terms = [c for c in (loss_terms(frames[0]) if frames else []) if all(c in df.columns for df in frames)]
    fig = _new_figure(max(6.0, 4.2 * len(terms)), 4.2)
    if not terms:
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no loss term shared by every variant", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, out_png)
    axes = np.atleast_1d(fig.subplots(1, len(terms)))
    label = smoothing_label(frames[0].index, smoothing)
    for ax, term in zip(axes, terms):
        for i, v in enumerate(variants):
            if v not in curves:
                continue
            wide = pd.concat([_smooth(pd.to_numeric(df[term], errors="coerce"), smoothing) for df in curves[v]],
                             axis=1).sort_index()
            color = f"C{i % 10}"
            ax.plot(wide.index, wide.mean(axis=1), color=color, linewidth=1.5, label=f"{v} (n={wide.shape[1]})")
            if wide.shape[1] > 1:
                ax.fill_between(wide.index, wide.min(axis=1), wide.max(axis=1), color=color, alpha=0.2, linewidth=0)
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{term} (unweighted)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"loss terms shared by every variant; {label}; mean over seeds, min-max shaded", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)
