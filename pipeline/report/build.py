"""The report, one function per section, assembled into ``report.md``, ``report.html``,
``ablation.md`` and ``ablation.json``.

A section function takes the :class:`Inputs` and returns a :class:`Section`, or None when
it does not apply (no ablation grid, no retraining, ...). :func:`sections` calls them in
order, so a new section is one function plus one line there. A section writes the figures
it shows. No torch here except in :func:`qualitative_section`, which imports it itself.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ..io import write_json, write_text
from . import ablation as ab
from . import evidence as ev
from .figures import plot_per_class_iou, plot_training_curve
from .html import render_html
from .tables import (metrics_table_markdown, per_class_table_markdown, reference_bound_markdown, sort_per_class,
                     split_markdown)

REPRODUCIBILITY = ("Rerunning this commit with the same params on the same machine and the same number of torch "
                   "threads gives bit-identical numbers; another CPU (or thread count) gives different ones, "
                   "because floating-point sums are ordered differently (README, *Reproducibility*).")


VERDICT_HEADING = "Does similarity transfer help?"
GRID_SECTIONS = ("Trivial baselines", "Ablation", VERDICT_HEADING, "Paired differences", "DistLoss weight sweep",
                 "Similarity diagnostics")


@dataclass
class Section:
    heading: str
    markdown: str                                   # the body; figure links relative to the report folder
    figures: dict[str, Path] = field(default_factory=dict)     # caption -> PNG, embedded in the HTML


@dataclass
class Grid:
    """An ablation grid's results: :func:`ablation.ablation_table` of its cells."""
    table: pd.DataFrame
    cells_dir: Path
    variants: list[str]
    seeds: list[int]
    iterations: int                                 # training iterations of every cell
    cells: pd.DataFrame | None = None               # :func:`ablation.grid_cells` (read once by the stage)
    splits: list[int] = field(default_factory=list)     # ablation.splits; [] = the report's split only

    @property
    def multi_split(self) -> bool:
        return len(self.splits) > 1

    def cell_rows(self) -> pd.DataFrame:
        if self.cells is None:
            self.cells = ab.grid_cells(self.cells_dir, [(v, s) for v in self.variants for s in self.seeds])
        return self.cells


@dataclass
class Inputs:
    title: str
    dataset: str
    split: int
    metrics: dict                                   # the evaluate stage's metrics.json
    per_class: pd.DataFrame                         # its per_class_iou.csv
    curve: pd.DataFrame                             # the train stage's curve
    report_dir: Path                                # folder of the markdown files
    figures_dir: Path
    smoothing: int = 10
    run: dict[str, Any] = field(default_factory=dict)   # commit, date, experiment, iterations, seed, changed
    retrain: dict | None = None                     # retrain stage's metrics (None or {} when off)
    grid: Grid | None = None
    qualitative: tuple[Path, Path, dict] | None = None  # model file, dataset folder, index.json
    baselines: dict | None = None                   # the baselines stage's JSON (trivial baselines)
    pp_weights: dict[str, float] = field(default_factory=dict)   # grid variant -> loss.pp_weight (the sweep)
    novel_masks: dict[str, str] = field(default_factory=dict)    # grid variant -> what of it uses novel masks
    data_setting: str = ""                          # what the data models (the verdict section)


def _figure(r: Inputs, caption: str, name: str) -> tuple[Path, str]:
    path = r.figures_dir / name
    return path, f"![{caption}]({os.path.relpath(path, r.report_dir)})\n"


KEY_DIFFERENCE = ("full", "+complementary")        # the paper's claim: the similarity losses add to CompLoss


HEADLINE_VARIANT = "full"                          # the headline: this variant's mean over the grid's seeds
HEADLINE_METRICS = (("mIoU_novel", "novel mIoU"), ("mIoU", "mIoU"), ("hIoU", "hIoU"))


def headline_line(r: Inputs) -> str:
    """The headline: full SimFormer's mean over the grid's seeds with its 95% t interval (a single
    seed's figure moves with the CPU and the thread count; the interval is what holds)."""
    v, g = HEADLINE_VARIANT, r.grid
    cells = g.cell_rows() if g is not None else None
    rows = cells.loc[cells["variant"] == v] if cells is not None and "variant" in cells else None
    if rows is None or len(rows) < 2:
        return (f"- **Headline**: no `{v}` cells over two or more seeds in this run's grid, so no interval: the "
                "main model's single seed below is a quick look, not a result that holds on another machine.")
    parts = []
    for key, label in HEADLINE_METRICS:
        x = rows[key].astype(float).dropna().to_numpy() if key in rows else np.array([])
        if x.size < 2:
            continue
        lo, hi = stats.t.interval(0.95, x.size - 1, loc=x.mean(), scale=x.std(ddof=1) / np.sqrt(x.size))
        parts.append(f"{label} **{ev._f(x.mean())}** [{ev._f(lo)}, {ev._f(hi)}]")
    splits = ab.splits_of(rows)
    if len(splits) > 1:         # a grid over several splits: cells of (split, seed), each split's seeds
        seeds = ", ".join(str(int(s)) for s in sorted(set(rows["seed"])))
        what = (f"{len(rows)} cells** (splits {', '.join(str(int(k)) for k in splits)} × seeds {seeds}, pooled; "
                f"{g.iterations} iterations each)")
    else:
        seeds = ", ".join(str(int(s)) for s in sorted(rows["seed"]))
        what = f"{len(rows)} seeds** ({seeds}; {g.iterations} iterations each)"
    return (f"- **Headline: full SimFormer over {what}, "
            f"mean and 95% t interval: " + ", ".join(parts) + ". One seed's figure moves with the CPU and the "
            "thread count; quote the interval.")


def answer_section(r: Inputs) -> Section:
    """Four lines: the headline (full SimFormer's mean over the grid's seeds with its interval),
    the main model against its target, the grid's variants ordered by novel mIoU, and the key
    paired difference (full − +complementary, novel mIoU) with its interval."""
    m, run = r.metrics, r.run
    name = run.get("main_run") or f"seed {run.get('seed', '?')}"
    line1 = (f"- **Main model** ({name}, {run.get('iterations', '?')} iterations): novel mIoU "
             f"{ev._f(m.get('mIoU_novel'))}, mIoU {ev._f(m.get('mIoU'))}, pAcc {ev._f(m.get('pAcc'))}")
    nc = (r.baselines or {}).get("nearest_colour") or {}
    if m.get("mIoU") is not None and m.get("pAcc") is not None and nc.get("mIoU") is not None:
        target = ev.CONVERGED_MIOU_RATIO * nc["mIoU"]
        met = m["pAcc"] >= ev.CONVERGED_PACC and m["mIoU"] >= target
        line1 += (f": {'meets' if met else '**misses**'} its target (pAcc ≥ {ev.CONVERGED_PACC:.0f} and mIoU ≥ "
                  f"{ev._f(target)}, {ev.CONVERGED_MIOU_RATIO:g}× the nearest-colour baseline's).")
    else:
        line1 += ": no target to compare with (the baselines stage's output is missing)."
    g = r.grid
    if g is None:
        line2 = "- **Grid**: none in this run (params.yaml has no `ablation` group)."
        line3 = f"- **{KEY_DIFFERENCE[0]} − {KEY_DIFFERENCE[1]}**: no grid, no paired difference."
    else:
        t = g.table.set_index("variant")["mIoU_novel_mean"].dropna().sort_values(ascending=False)
        over = (f"mean over splits {', '.join(map(str, g.splits))} and seeds {', '.join(map(str, g.seeds))}, pooled"
                if g.multi_split else f"mean over seeds {', '.join(map(str, g.seeds))}")
        line2 = (f"- **Grid by novel mIoU** ({over}): "
                 + " > ".join(f"{v} {ev._f(x)}" for v, x in t.items()) + ".")
        a, b = KEY_DIFFERENCE
        pair = ev.paired_table(g.cell_rows(), comparisons=(KEY_DIFFERENCE,), metrics=(("mIoU_novel", "novel mIoU"),))
        if pair.empty:
            line3 = f"- **{a} − {b}**, novel mIoU: not measured (the grid lacks one of the two variants)."
        else:
            d = pair.iloc[0]
            if d["n"] < 2:
                verdict = "one seed: no interval"
                ci = ""
            else:
                verdict = ("resolved: a > b" if d["ci_low"] > 0 else "resolved: a < b" if d["ci_high"] < 0
                           else "not resolved (the interval spans 0)")
                ci = f" (95% CI [{ev._f(d['ci_low'])}, {ev._f(d['ci_high'])}])"
            pairs = f"{int(d['n'])} pairs (split, seed)" if g.multi_split else f"{int(d['n'])} seeds"
            line3 = (f"- **{a} − {b}**, novel mIoU paired over {pairs}: "
                     f"{ev._f(d['mean']):s}{ci}; {verdict}.").replace(": -", ": −")
    return Section("Answer", "\n".join([headline_line(r), line1, line2, line3]) + "\n\nThe evidence follows; how the run was made is "
                   "under *Run* at the end.\n")


def run_section(r: Inputs) -> Section:
    run, grid = r.run, r.grid
    lines = [f"- dataset: `{r.dataset}`, split {r.split}",
             f"- commit: `{run.get('commit', 'unknown')}`; DVC experiment: `{run.get('experiment', 'workspace')}`",
             f"- date: {run.get('date', 'unknown')}",
             f"- main model: {run.get('iterations', '?')} iterations, seed {run.get('seed', '?')}"]
    if grid is not None and grid.splits:        # ablation.splits set: say which, even one
        lines.append(f"- ablation grid: {len(grid.variants)} variants × splits {', '.join(map(str, grid.splits))} × "
                     f"seeds {', '.join(map(str, grid.seeds))}; {grid.iterations} iterations per cell; each split's "
                     f"cells start from that split's own weak-shot pre-training (split {r.split}'s: the pipeline's)"
                     + ("; the grid's means pool splits and seeds, its paired differences pair by (split, seed)"
                        if grid.multi_split else ""))
    elif grid is not None:
        lines.append(f"- ablation grid: {len(grid.variants)} variants × seeds {', '.join(map(str, grid.seeds))}; "
                     f"{grid.iterations} iterations per cell")
    changed = run.get("changed")
    if changed is None:
        lines.append("- params: the committed params.yaml could not be read (not a git checkout?)")
    elif not changed:
        lines.append("- params: as committed (params.yaml unchanged)")
    else:
        lines.append("- params changed from the committed params.yaml: "
                     + "; ".join(f"`{k}` {new!r} (committed {old!r})" for k, (new, old) in changed.items()))
    text = "\n".join(lines) + "\n\n" + REPRODUCIBILITY + "\n"
    if grid is not None:
        text += ("\nHow long each run trained (a cell reused from the main training shows the main model's time; "
                 "`seconds` of the curve's last row, which a resumed run continues):\n\n"
                 + ev.training_time_markdown(grid.cell_rows(), r.curve))
    elif r.curve is not None and not r.curve.empty and "seconds" in r.curve:
        text += (f"\nThe main model trained {int(r.curve['step'].iloc[-1])} steps in "
                 f"{float(r.curve['seconds'].iloc[-1]):.0f} s.\n")
    return Section("Run", text)


def metrics_section(r: Inputs) -> Section:
    return Section("Metrics", "Percent, from one confusion matrix over the test set; classes absent from both "
                              "prediction and ground truth are left out of the means.\n\n"
                   + metrics_table_markdown(r.metrics))


def baselines_section(r: Inputs) -> Section | None:
    if not r.baselines:
        return None
    models = {"main model (this report)": r.metrics}
    if r.grid is not None:
        t = r.grid.table.set_index("variant")
        pacc = r.grid.cell_rows().groupby("variant")["pAcc"].mean()
        unit = "cells: splits × seeds" if r.grid.multi_split else "seeds"
        for v in t.index:
            models[f"grid: {v} (mean of {int(t.loc[v, 'n'])} {unit})"] = {
                "mIoU": t.loc[v, "mIoU_mean"], "mIoU_base": t.loc[v, "mIoU_base_mean"],
                "mIoU_novel": t.loc[v, "mIoU_novel_mean"], "hIoU": t.loc[v, "hIoU_mean"], "pAcc": pacc.get(v)}
    return Section("Trivial baselines", ev.quick_look_banner(r.metrics, r.baselines)
                   + "A model is worth reporting only well above these.\n\n" + ev.baselines_markdown(r.baselines, models))


def split_section(r: Inputs) -> Section:
    return Section("Split", split_markdown(r.per_class))


def per_class_section(r: Inputs) -> Section:
    path, link = _figure(r, "Per-class IoU", "per_class_iou.png")
    plot_per_class_iou(r.per_class, path)
    return Section("Per-class IoU", "Sorted by split (base, novel), then IoU.\n\n"
                   + per_class_table_markdown(sort_per_class(r.per_class)) + "\n" + link, {"Per-class IoU": path})


def training_section(r: Inputs) -> Section:
    path, link = _figure(r, "Training curve", "train_curve.png")
    plot_training_curve(r.curve, path, r.smoothing)
    return Section("Training curve", "Total loss and each (unweighted) loss term of the main model.\n\n" + link,
                   {"Training curve": path})


def reference_section(r: Inputs) -> Section | None:
    text = reference_bound_markdown(r.dataset, r.metrics)
    return Section("Reference bound", text) if text else None


def retrain_section(r: Inputs) -> Section | None:
    if not r.retrain:
        return None
    return Section("Pseudo-label retraining", (
        "The train set relabelled by the model above (novel pixels whose predicted class is in the image's labels, "
        "base pixels from ground truth), then a fully supervised retraining on those labels. "
        f"{r.retrain.get('pseudo_novel_precision', float('nan')):.1f}% of pseudo-labelled novel pixels agree with "
        "the ground truth.\n\n" + metrics_table_markdown(r.retrain)))


def ablation_section(r: Inputs) -> Section | None:
    g = r.grid
    if g is None:
        return None
    notes = ab.ablation_notes(g.table, g.iterations, r.run.get("iterations"))
    notes += [f"**`{v}` uses novel masks ({use})**: a diagnostic or a bound, not a weak-shot result."
              for v, use in r.novel_masks.items() if v in g.variants]
    novel = ab.novel_class_iou(g.cells_dir, g.variants)
    bars, bars_link = _figure(r, "Novel-class IoU per variant", "novel_class_iou.png")
    curves, curves_link = _figure(r, "Training curves per variant", "variant_curves.png")
    ab.plot_novel_class_iou(novel, bars)
    ab.plot_variant_curves(g.cells_dir, g.variants, curves, r.smoothing)
    over = "mean over the seeds of the split where the class is novel" if g.multi_split else "mean over seeds"
    text = (ab.ablation_markdown(g.table, r.dataset, notes=notes) + f"\nNovel-class IoU (percent, {over}):"
            "\n\n" + ab.novel_class_markdown(novel) + "\n" + bars_link + "\n" + curves_link)
    return Section("Ablation", text, {"Novel-class IoU per variant": bars, "Training curves per variant": curves})


def paired_section(r: Inputs) -> Section | None:
    g = r.grid
    if g is None:
        return None
    return Section("Paired differences", ev.paired_markdown(ev.paired_table(g.cell_rows())))


def sweep_section(r: Inputs) -> Section | None:
    g = r.grid
    weights = {v: w for v, w in r.pp_weights.items() if g is not None and v in g.variants}
    if len(weights) < 3:
        return None
    cells = g.cell_rows()
    sweep = ev.sweep_frame(cells, weights)
    path, link = _figure(r, "Novel and base mIoU against the DistLoss weight", "pp_weight_sweep.png")
    ev.plot_sweep(sweep, path)
    over = "the cells, pooled over splits and seeds" if g.multi_split else "seeds"
    return Section("DistLoss weight sweep", f"Full SimFormer with only `loss.pp_weight` changed. Mean ± std over "
                   f"{over}.\n\n" + ev.sweep_markdown(sweep) + "\n" + link,
                   {"DistLoss weight sweep": path})


def verdict_section(r: Inputs) -> Section | None:
    g = r.grid
    if g is None:
        return None
    text = ev.similarity_verdict_markdown(g.cell_rows(), r.novel_masks, r.data_setting)
    return Section(VERDICT_HEADING, text) if text else None


def diagnostics_section(r: Inputs) -> Section | None:
    """Headline: the held-out AUCs per variant (:func:`evidence.heldout_markdown`); then the
    single-batch AUCs and gradient norms logged during training."""
    g = r.grid
    if g is None:
        return None
    cells = g.cell_rows()
    held = ev.heldout_frame(cells, g.variants)
    diag = ev.diagnostics_frame(cells, g.variants)
    if diag.empty and held.empty:
        return None
    parts, figures = [], {}
    if not held.empty:
        parts.append(ev.heldout_markdown(held, r.novel_masks))
    if not diag.empty:
        path, link = _figure(r, "AUC on novel pixel pairs during training", "similarity_auc.png")
        ev.plot_diagnostics(diag, path)
        figures["Similarity diagnostics"] = path
        parts.append("### During training (one training batch per logged step)\n\n" + ev.diagnostics_markdown(diag)
                     + "\n" + link)
    return Section("Similarity diagnostics", "\n".join(parts), figures)


def qualitative_section(r: Inputs) -> Section | None:
    if r.qualitative is None:
        return None
    import torch

    from ..engine.evaluate import load_trained
    from .qualitative import render_qualitative

    model_path, dataset_dir, index = r.qualitative
    model, _, split = load_trained(model_path, torch.device("cpu"))
    path, link = _figure(r, "Qualitative results", "qualitative.png")
    render_qualitative(model, dataset_dir, index, split, path, device=torch.device("cpu"))
    return Section("Qualitative results", "Image, ground truth, prediction, and the three most confident "
                   "proposals (class, score, binary mask; * = novel class).\n\n" + link, {"Qualitative results": path})


def sections(r: Inputs) -> list[Section]:
    found = [answer_section(r), metrics_section(r), baselines_section(r), split_section(r), per_class_section(r),
             training_section(r), reference_section(r), retrain_section(r), ablation_section(r), verdict_section(r),
             paired_section(r), sweep_section(r), diagnostics_section(r), qualitative_section(r), run_section(r)]
    return [s for s in found if s is not None]


def to_markdown(title: str, parts: list[Section]) -> str:
    return f"# {title}\n\n" + "\n".join(f"## {s.heading}\n\n{s.markdown.rstrip()}\n" for s in parts)


def write_report(r: Inputs, md: Path, html: Path | None = None, ablation_md: Path | None = None,
                 ablation_json: Path | None = None) -> list[Section]:
    """Build every section, write the files asked for, and return the sections."""
    r.figures_dir.mkdir(parents=True, exist_ok=True)
    parts = sections(r)
    write_text(md, to_markdown(r.title, parts))
    if html is not None:
        write_text(html, render_html(r.title, [(s.heading, s.markdown) for s in parts],
                                     {k: v for s in parts for k, v in s.figures.items()}))
    grid = [s for s in parts if s.heading in GRID_SECTIONS]
    if ablation_md is not None and grid:
        write_text(ablation_md, to_markdown(f"{r.title}: ablation", grid))
    if ablation_json is not None and r.grid is not None:
        write_json(ablation_json, ab.ablation_summary(r.grid.table))
    return parts


def grid_inputs(cells_dir, raw: dict, g, main_iterations: int) -> tuple[Grid, dict[str, float], dict[str, str]]:
    """The ablation grid of the cells in ``cells_dir`` (``g``: the params' AblationConfig, ``raw``: the
    parsed params file; ``main_iterations``: ``train.iterations``), the DistLoss weight sweep and the
    variants whose training reads novel masks: what the report shows of a grid (the report stage, and
    an offline bundle's report: pipeline/offline.py)."""
    from ..ablation import grid_cells, novel_mask_variants, pp_weight_sweep
    variants = list(g.run)
    cells = ab.grid_cells(cells_dir, [c.key for c in grid_cells(g, raw["data"]["split"])])
    table = ab.ablation_table(cells, variants, baseline="baseline" if "baseline" in variants else variants[0])
    grid = Grid(table, Path(cells_dir), variants, list(g.seeds), g.iterations or main_iterations, cells,
                list(g.splits))
    return grid, pp_weight_sweep(raw, g), novel_mask_variants(raw, g)


def data_setting(p) -> str:
    """What the data of this run models (the verdict section's data setting)."""
    if p.data.dataset == "synthetic":
        from ..data.synthetic import describe_setting
        return describe_setting(p.data.synthetic.cooccur)
    return (f"the real dataset `{p.data.dataset}`, split {p.data.split}: its classes co-occur as they do in its "
            "scenes, beside unlabelled pixels")
