"""What the grid's numbers are worth: trivial baselines beside the models, paired differences
over seeds with confidence intervals, the DistLoss weight sweep and the similarity
diagnostics logged during training.

Inputs are plain tables: ``cells`` is :func:`pipeline.report.ablation.load_cells`' frame (one
row per cell: ``variant, seed, split``, the summary metrics, ``cell_dir`` holding ``curve.csv``).
Two variants' cells pair by ``(split, seed)`` (:func:`pipeline.report.ablation.pair_keys`): on
one split that is pairing by seed; over several (``ablation.splits``) each split's cells pair
among themselves, and the text says "pairs (split, seed)".
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
from .ablation import pair_keys, splits_of  # noqa: E402
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
    mean, ci_low, ci_high, p_value, seeds`` (the pairs' ``(split, seed)``); pairs are cells of the
    same split and seed."""
    rows = []
    have = set(cells["variant"])
    for a, b in comparisons:
        if a not in have or b not in have:
            continue
        for key, label in metrics:
            va, vb = (_by_pair(cells, v, key) for v in (a, b))
            d = paired_difference(va, vb, confidence)
            rows.append({"a": a, "b": b, "metric": label, **d})
    return pd.DataFrame(rows)


def _by_pair(cells: pd.DataFrame, variant: str, metric: str) -> dict[tuple, float]:
    sub = cells.loc[cells["variant"] == variant]
    return dict(zip(pair_keys(sub), sub[metric].astype(float)))


def paired_markdown(table: pd.DataFrame, confidence: float = 0.95) -> str:
    if table.empty:
        return "No two variants of the comparisons share a seed.\n"
    multi = len({k for ks in table["seeds"] for k, _ in ks}) > 1
    pairs = "pairs (split, seed)" if multi else "seeds (pairs)"
    lines = [f"| difference | metric | {pairs} | mean | {int(confidence * 100)}% CI | p (paired t) | verdict |",
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
    head = ("Paired over seeds: the cells of one seed share the data order, the augmentations and the "
            "initialisation, so the per-seed difference removes the seed's own luck.")
    if multi:
        head = ("Paired by split and seed, pairs (split, seed): the cells of one split and seed share the split's "
                "classes, its pre-training, the data order, the augmentations and the initialisation, so the "
                "difference of a pair removes the split's and the seed's own luck.")
    return head + " Student t interval with n − 1 degrees of freedom.\n\n" + "\n".join(lines) + "\n"


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


# ----------------------------------------------------------------------------- held-out similarity diagnostics
# the keys of pipeline.engine.heldout.METRIC_KEYS (kept here: no torch in the report)
HELDOUT_KINDS = (("novel", "novel"), ("novel_unlabelled", "novel vs unlabelled"), ("base", "base"))
HELDOUT_SCORERS = (("simnet", "SimNet"), ("student", "student"), ("feature", "features"))
HELDOUT_KEYS = tuple(f"heldout_auc_{s}_{k}" for s, _ in HELDOUT_SCORERS for k, _ in HELDOUT_KINDS)


def heldout_frame(cells: pd.DataFrame, variants: Sequence[str] | None = None) -> pd.DataFrame:
    """The held-out AUCs of the cells (``cell.json`` ``heldout``; cells written before it existed
    are left out): ``variant, seed`` and the :data:`HELDOUT_KEYS` (NaN where a cell has none)."""
    import json
    rows = []
    for r in cells.itertuples():
        if variants is not None and r.variant not in variants:
            continue
        path = Path(r.cell_dir) / "cell.json"
        held = json.loads(path.read_text()).get("heldout") if path.is_file() else None
        if not held:
            continue
        rows.append({"variant": r.variant, "seed": r.seed,
                     **{k: float("nan") if held.get(k) is None else float(held[k]) for k in HELDOUT_KEYS}})
    return pd.DataFrame(rows)


def heldout_markdown(frame: pd.DataFrame, novel_masks: Mapping[str, str] | None = None) -> str:
    """Per variant (in the frame's order), each scorer's held-out AUC on each kind of pair, mean ±
    std over seeds; a variant whose training used novel masks is marked."""
    if frame.empty:
        return "No held-out similarity diagnostics in the cells (trained before they were recorded).\n"
    novel_masks = novel_masks or {}
    head = ["variant", "seeds"] + [f"{kl}: {sl}" for kk, kl in HELDOUT_KINDS for sk, sl in HELDOUT_SCORERS]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---|" * (len(head) - 2)]
    for v, sub in frame.groupby("variant", sort=False):
        name = f"{v} (uses novel masks: {novel_masks[v]})" if v in novel_masks else v
        vals = []
        for kk, _ in HELDOUT_KINDS:
            for sk, _ in HELDOUT_SCORERS:
                col = sub[f"heldout_auc_{sk}_{kk}"].astype(float)
                m, s = col.mean(), col.std(ddof=1) if col.notna().sum() > 1 else float("nan")
                vals.append("n/a" if math.isnan(m) else f"{m:.3f}" + ("" if math.isnan(s) else f" ± {s:.3f}"))
        lines.append(f"| {name} | {len(sub)} | " + " | ".join(vals) + " |")
    return ("After training, on the same 10^5 test pixel pairs for every cell (fixed seed; half within one image, "
            "half across two; mask-feature resolution), the AUC of ranking *same class* above *different*: "
            "**novel** = same novel class against two novel classes, **novel vs unlabelled** = same novel class "
            "against a novel pixel with an unlabelled (255) one, **base** = same against different base class. "
            "Scorers: SimNet (DistLoss's teacher), the student (ReLU cosine of the novel score vectors, DistLoss's "
            "student) and the plain cosine of the mask features SimNet reads. Mean ± std over seeds; 0.5 = chance. "
            "DistLoss can teach the student only where SimNet's AUC exceeds the student's; SimNet adds something "
            "over the features only where its AUC exceeds theirs.\n\n" + "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- does similarity transfer help?
ENDPOINT = ("full", "pp0")                      # DistLoss on vs off; both train SimLoss
HEADROOM = ("full_oracle_teacher", "pp0")       # a perfect teacher vs DistLoss off (uses novel masks)
ENDPOINT_METRIC = "mIoU_novel"


NOISE_FLOOR = ("pp0", "+complementary")       # SimLoss on vs off: nothing of it reaches the model but clipping


def noise_floor_line(cells: pd.DataFrame, results: Sequence[Mapping], compared: Sequence[tuple[str, str]]) -> str:
    """How noisy a pair is when no training signal differs: :data:`NOISE_FLOOR` (``pp0`` - ``+complementary``,
    novel mIoU, 95% t interval), whose only path to the segmentation model is the global gradient clipping
    (SimLoss trains SimNet on detached features), beside the paired SDs of the section's comparisons."""
    a, b = NOISE_FLOOR
    d = paired_difference(_by_pair(cells, a, ENDPOINT_METRIC), _by_pair(cells, b, ENDPOINT_METRIC))
    sds = "; ".join(f"{x} − {y} {_f(r['sd'])}" for (x, y), r in zip(compared, results))
    return (f"Noise floor: `{a}` − `{b}` trains the same segmentation model (SimLoss trains SimNet on detached "
            "features; its one path to the model is the global gradient clipping), yet its novel mIoU differs by "
            f"{_f(d['mean'])} [{_f(d['ci_low'])}, {_f(d['ci_high'])}] (95%) with a paired SD of {_f(d['std'])} "
            f"over {d['n']} pairs. Paired SDs of this section's comparisons: {sds}. Most of a pair's spread is two "
            "trainings drifting apart, not an effect that varies.")


def by_split_lines(compared: Sequence[tuple[tuple[str, str], Mapping[tuple, float]]]) -> list[str]:
    """The section's comparisons split by split (novel mIoU, descriptive: no interval, not part of the
    verdict), from each comparison's ``((a, b), paired_diffs(cells, a, b))``: pairs, mean, SD and pairs
    above 0 per split, and whether the splits differ more than the pairs of one split do
    (:func:`pipeline.report.verdict.between_splits`, one-way ANOVA)."""
    from .verdict import between_splits
    lines = ["By split (novel mIoU; descriptive, not part of the verdict: a split whose novel classes gain or "
             "lose consistently would stand out here, and the ANOVA asks whether the splits differ more than the "
             "pairs of one split do):", "",
             "| comparison | split | pairs | mean | SD | above 0 |", "|---|---|---|---|---|---|"]
    tests = []
    for (a, b), diffs in compared:
        groups: dict = {}
        for (split, _), d in diffs.items():
            groups.setdefault(split, []).append(d)
        res = between_splits(groups)
        lines += [f"| {a} − {b} | {r['split']} | {r['n']} | {_f(r['mean'])} | {_f(r['sd'])} | {r['up']} of {r['n']} |"
                  for r in res["splits"]]
        if math.isfinite(res["F"]):
            tests.append(f"{a} − {b} F({res['df_between']}, {res['df_within']}) = {_f(res['F'], 2)}, "
                         f"p = {_f(res['p_value'], 3)}")
        else:
            tests.append(f"{a} − {b}: too few pairs per split to test")
    return lines + ["", "Between splits (one-way ANOVA of the paired differences): " + "; ".join(tests) + "."]


def paired_diffs(cells: pd.DataFrame, a: str, b: str, metric: str = ENDPOINT_METRIC) -> dict[tuple, float]:
    """``{(split, seed): a - b}`` of ``metric`` over the pairs (cells of one split and seed) where both
    variants have a finite value."""
    va, vb = _by_pair(cells, a, metric), _by_pair(cells, b, metric)
    both = sorted((k for k in set(va) & set(vb) if math.isfinite(va[k]) and math.isfinite(vb[k])),
                  key=lambda k: (k[0] is not None, k[0] or 0, k[1]))
    return {k: float(va[k] - vb[k]) for k in both}


def per_class_diffs(cells: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Per novel class: ``id, name, diff`` = the mean over the pairs (split, seed) of IoU(a) - IoU(b)
    (pairs where the class is novel and has an IoU in both cells: a class novel in one split of the
    grid is averaged over that split's seeds), ``seeds`` = how many pairs, ``splits`` = the splits
    where it is novel (e.g. ``"2"``); classes with none left out."""
    from .ablation import _read_per_class
    iou: dict[tuple[str, tuple], pd.Series] = {}
    names: dict[int, str] = {}
    rows_ab = cells.loc[cells["variant"].isin([a, b])]
    for r, key in zip(rows_ab.itertuples(), pair_keys(rows_ab)):
        pc = _read_per_class(Path(r.cell_dir) / "per_class_iou.csv")
        pc = pc.loc[pc["split"].astype(str) == "novel"]
        names.update(zip(pc["id"].astype(int), pc["name"].astype(str)))
        iou[(r.variant, key)] = pc.set_index(pc["id"].astype(int))["iou"].astype(float)
    pairs = sorted({k for v, k in iou if v == a} & {k for v, k in iou if v == b},
                   key=lambda k: (k[0] is not None, k[0] or 0, k[1]))
    rows = []
    for cid in sorted(names):
        d = [(k, iou[(a, k)].get(cid, float("nan")) - iou[(b, k)].get(cid, float("nan"))) for k in pairs]
        d = [(k, x) for k, x in d if math.isfinite(x)]
        if d:
            splits = ", ".join(str(s) for s in sorted({k[0] for k, _ in d if k[0] is not None}))
            rows.append({"id": cid, "name": names[cid], "diff": sum(x for _, x in d) / len(d), "seeds": len(d),
                         "splits": splits})
    return pd.DataFrame(rows, columns=["id", "name", "diff", "seeds", "splits"])


_ANSWER = {"resolved_up": "**Yes, here:** similarity transfer raises novel mIoU (the corrected interval lies above 0)",
           "resolved_down": "**No, it hurts here:** similarity transfer lowers novel mIoU (the corrected interval "
                            "lies below 0)",
           "equivalent": "**No difference that matters:** the corrected interval lies inside ±{m:g} points",
           "unresolved": "**Not settled:** the corrected interval is too wide to tell a gain, a loss or no difference "
                         "(±{m:g} points) apart"}


def similarity_verdict_markdown(cells: pd.DataFrame, novel_masks: Mapping[str, str] | None = None,
                                data_setting: str = "") -> str | None:
    """The report's "Does similarity transfer help?" section: None unless the grid has the
    :data:`ENDPOINT` variants. Endpoint novel mIoU ``full - pp0`` paired by (split, seed) with its verdict
    (:func:`pipeline.report.verdict.verdict`, Bonferroni over the comparisons stated here), the
    headroom control (:data:`HEADROOM`, labelled as using novel masks) when present, the pairs
    needed for 80% power on a 3-point effect from this grid's paired SD, the held-out AUCs, a
    per-class sign test and the data setting."""
    from .verdict import EQUIVALENCE_MARGIN, TARGET_EFFECT, TARGET_POWER, pairs_for_power, sign_test, verdict
    have = set(cells["variant"])
    if not set(ENDPOINT) <= have:
        return None
    novel_masks = novel_masks or {}
    rows = [(ENDPOINT, "endpoint: similarity transfer (DistLoss with SimNet's teacher) on vs off")]
    if HEADROOM[0] in have:
        rows.append((HEADROOM, "headroom control: a perfect teacher (the true pair relation; **uses novel masks**, "
                               "a diagnostic, not a weak-shot result) vs DistLoss off"))
    k = len(rows)
    results, diffs = [], []
    splits = splits_of(cells.loc[cells["variant"].isin(ENDPOINT)])
    multi = len(splits) > 1
    lines = [f"| comparison | what | {'pairs (split, seed)' if multi else 'pairs (seeds)'} | mean | CI | verdict |",
             "|---|---|---|---|---|---|"]
    for (a, b), what in rows:
        d = paired_diffs(cells, a, b)
        v = verdict(list(d.values()), comparisons=k)
        results.append(v)
        diffs.append(((a, b), d))
        ci = f"[{_f(v['ci_low'])}, {_f(v['ci_high'])}] ({v['level']:.1%})"
        lines.append(f"| {a} − {b} | {what} | {v['n']} | {_f(v['mean'])} | {ci} | `{v['verdict']}` |")
    end = results[0]
    paired = (f"over splits {', '.join(map(str, splits))}, pairs (split, seed): a pair is the two cells of one split "
              "and seed" if multi else "paired by seed")
    text = [f"Endpoint: **novel mIoU, `{ENDPOINT[0]}` − `{ENDPOINT[1]}`**, {paired} (the two train the same "
            "model with SimLoss; only DistLoss, the transfer of SimNet's similarity to the novel masks, differs). "
            f"Intervals: two-sided t, Bonferroni-corrected for the {k} comparison{'s' if k > 1 else ''} of this "
            f"section. Verdicts: `resolved_up` / `resolved_down` when the interval excludes 0, `equivalent` when it "
            f"lies inside ±{EQUIVALENCE_MARGIN:g} points, `unresolved` otherwise.", "", *lines,
            _ANSWER[end["verdict"]].format(m=EQUIVALENCE_MARGIN)
            + (f" (by {_f(end['mean'])} points, within the ±{EQUIVALENCE_MARGIN:g}-point margin)"
               if end["verdict"].startswith("resolved") and end["within_margin"] else "") + "."]
    if end["n"] >= 2 and math.isfinite(end["sd"]):
        need = pairs_for_power(end["sd"], TARGET_EFFECT, TARGET_POWER, comparisons=k)
        text.append(f"Sample size: with this grid's paired SD of {_f(end['sd'])} points, a {TARGET_EFFECT:g}-point "
                    f"effect needs **{need} pairs** for {TARGET_POWER:.0%} power (two-sided paired t, alpha 0.05/{k}); "
                    f"the grid has {end['n']}.")
    else:
        text.append("Sample size: fewer than 2 pairs, so no paired SD to plan from: add seeds (`ablation.seeds`) "
                    "or splits (`ablation.splits`).")
    if len(results) > 1:
        head = results[1]
        if head["verdict"] == "resolved_up" and end["verdict"] != "resolved_up":
            text.append("Headroom: a perfect teacher does raise novel mIoU on this data, SimNet's teacher has not been "
                        "shown to: the headroom exists, the transfer does not (yet) deliver it.")
        elif head["verdict"] == "resolved_up":
            text.append("Headroom: a perfect teacher raises novel mIoU too; compare the two means for how much of the "
                        "headroom SimNet's teacher delivers.")
        else:
            text.append(f"Headroom: even a perfect teacher gives no resolved gain (`{head['verdict']}`): on this data "
                        "pixel-pair similarity has little to add, so it cannot test the paper's claim.")
    else:
        text.append(f"Headroom: no `{HEADROOM[0]}` cells in the grid (add it to `ablation.run` to measure what a "
                    "perfect teacher would give).")
    text = text[:-3] + [x for t in text[-3:] for x in ("", t)]     # answer, sample size, headroom: paragraphs
    if NOISE_FLOOR[1] in have and end["n"] >= 2:
        text += ["", noise_floor_line(cells, results, [a_b for a_b, _ in rows])]
    if multi:
        text += ["", *by_split_lines(diffs)]
    pcd = per_class_diffs(cells, *ENDPOINT)
    st = sign_test(pcd["diff"])
    over = ("mean over the seeds of the split where the class is novel; the classes of every split" if multi
            else "mean over seeds")
    text += ["", f"Per novel class (IoU of `{ENDPOINT[0]}` − `{ENDPOINT[1]}`, {over}): {st['up']} up, "
             f"{st['down']} down, {st['ties']} tied; exact two-sided sign test p = {_f(st['p_value'], 3)}.", ""]
    if not pcd.empty and multi:
        text += ["| novel class | split | Δ IoU | seeds |", "|---|---|---|---|"]
        text += [f"| {r.name} | {r.splits} | {r.diff:+.1f} | {r.seeds} |" for r in pcd.itertuples()]
    elif not pcd.empty:
        text += ["| novel class | Δ IoU | seeds |", "|---|---|---|"]
        text += [f"| {r.name} | {r.diff:+.1f} | {r.seeds} |" for r in pcd.itertuples()]
    shown = [v for v in (ENDPOINT[1], ENDPOINT[0], HEADROOM[0]) if v in have]
    held = heldout_frame(cells, shown)
    if not held.empty:
        held = held.set_index("variant").loc[[v for v in shown if v in set(held["variant"])]].reset_index()
    text += ["", "Held-out pixel-pair AUCs of these variants:", "", heldout_markdown(held, novel_masks).rstrip()]
    if data_setting:
        text += ["", f"Data setting: {data_setting}."]
    return "\n".join(text) + "\n"
