"""The verdict rule (pipeline/report/verdict.py) and the report's "Does similarity transfer help?"
section, on hand-made paired differences and a hand-made grid."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from pipeline.report import evidence as ev
from pipeline.report.verdict import VERDICTS, between_splits, paired_power, pairs_for_power, sign_test, verdict


# ------------------------------------------------------------------ the rule
def test_resolved_up():
    v = verdict([4.0, 5.0, 6.0, 5.0, 4.0])
    assert v["verdict"] == "resolved_up" and v["n"] == 5 and v["mean"] == pytest.approx(4.8)
    assert v["ci_low"] > 0 and not v["within_margin"]


def test_resolved_down():
    assert verdict([-4.0, -5.0, -6.0, -5.0])["verdict"] == "resolved_down"


def test_equivalent():
    v = verdict([0.1, -0.2, 0.3, 0.0, 0.1])
    assert v["verdict"] == "equivalent" and -2 < v["ci_low"] < 0 < v["ci_high"] < 2


def test_unresolved():
    assert verdict([5.0, -5.0, 10.0, -3.0])["verdict"] == "unresolved"
    assert verdict([3.0])["verdict"] == "unresolved" and math.isnan(verdict([3.0])["ci_low"])     # one pair
    assert verdict([])["n"] == 0


def test_interval_is_the_bonferroni_corrected_t_interval():
    from scipy import stats
    d = [1.0, 2.0, 4.0, 3.0, 5.0]
    v = verdict(d, comparisons=2)
    half = stats.t.ppf(1 - 0.025 / 2, 4) * np.std(d, ddof=1) / math.sqrt(5)
    assert v["level"] == pytest.approx(0.975)
    assert (v["ci_low"], v["ci_high"]) == pytest.approx((3.0 - half, 3.0 + half))
    # corrected for more comparisons, the same differences may no longer resolve
    d2 = [1.0, 3.0, 1.5, 2.5]
    assert verdict(d2, comparisons=1)["verdict"] == "resolved_up"
    assert verdict(d2, comparisons=20)["verdict"] == "unresolved"


def test_resolved_but_inside_the_margin_is_still_resolved():
    v = verdict([0.5, 0.6, 0.55, 0.5, 0.6])
    assert v["verdict"] == "resolved_up" and v["within_margin"]


def test_verdict_names():
    assert VERDICTS == ("resolved_up", "resolved_down", "equivalent", "unresolved")
    with pytest.raises(ValueError):
        verdict([1.0, 2.0], comparisons=0)


def test_pairs_for_power_known_values():
    """The paired t-test's sample sizes for 80% power at alpha 0.05, two-sided (G*Power's matched-pairs
    table): dz = 1 needs 10 pairs (power 0.8031), dz = 0.5 needs 34 (0.8078)."""
    assert pairs_for_power(3.0, effect=3.0) == 10
    assert pairs_for_power(6.0, effect=3.0) == 34
    assert paired_power(10, 3.0, 3.0) == pytest.approx(0.8031, abs=5e-4)
    assert paired_power(9, 3.0, 3.0) < 0.8
    assert pairs_for_power(6.0, effect=3.0, comparisons=2) > 34        # Bonferroni costs pairs
    assert pairs_for_power(0.0) == 2


def test_between_splits_is_the_one_way_anova_of_hand_made_groups():
    from scipy import stats
    # split 1: 1, 2, 3 (mean 2); split 2: 4, 5, 6 (mean 5); grand mean 3.5
    # SS between = 3 * 1.5^2 * 2 = 13.5 (df 1); SS within = 2 + 2 = 4 (df 4): F = 13.5 / (4 / 4) = 13.5
    r = between_splits({1: [1.0, 2.0, 3.0], 2: [4.0, 5.0, 6.0]})
    assert r["F"] == pytest.approx(13.5) and (r["df_between"], r["df_within"]) == (1, 4)
    assert r["p_value"] == pytest.approx(float(stats.f.sf(13.5, 1, 4)))
    assert [(x["split"], x["n"], x["mean"], x["sd"], x["up"]) for x in r["splits"]] == [(1, 3, 2.0, 1.0, 3),
                                                                                      (2, 3, 5.0, 1.0, 3)]
    # a split with one pair is shown but left out of the test; one testable split is no test
    one = between_splits({1: [1.0, -2.0], 2: [3.0, float("nan")]})
    assert [(x["split"], x["n"], x["up"]) for x in one["splits"]] == [(1, 2, 1), (2, 1, 1)]
    assert math.isnan(one["splits"][1]["sd"]) and math.isnan(one["F"]) and math.isnan(one["p_value"])
    assert one["df_between"] == one["df_within"] == 0


def test_sign_test():
    st = sign_test([1.0, 2.0, -1.0, 0.0, 3.0, float("nan")])
    assert (st["up"], st["down"], st["ties"]) == (3, 1, 1)
    assert st["p_value"] == pytest.approx(0.625)
    assert sign_test([1.0] * 8)["p_value"] == pytest.approx(2 / 256)
    assert math.isnan(sign_test([0.0])["p_value"])


# ------------------------------------------------------------------ the report section
NOVEL_IOU = {"pp0": (30.0, 40.0, 20.0), "full": (31.0, 39.0, 25.0), "full_oracle_teacher": (45.0, 50.0, 40.0),
             "+complementary": (29.0, 40.0, 20.0)}


def _write_cell(root, variant, seed, novel_miou):
    d = root / f"{variant}-{seed}"
    d.mkdir(parents=True)
    held = {k: 0.5 + 0.01 * seed for k in ev.HELDOUT_KEYS}
    held["heldout_auc_simnet_novel"] = {"pp0": 0.6, "full": 0.62, "full_oracle_teacher": 0.61,
                                                "+complementary": 0.5}[variant] + 0.01 * seed
    (d / "cell.json").write_text(json.dumps({"variant": variant, "seed": seed, "params_hash": f"{variant}{seed}",
                                             "shared_with_main": False, "dataset": "synthetic", "split": 1,
                                             "iterations": 10, "heldout": held}))
    (d / "metrics.json").write_text(json.dumps({"mIoU": 50.0, "mIoU_base": 60.0, "mIoU_novel": novel_miou,
                                                "hIoU": 40.0, "pAcc": 80.0, "mAcc": 60.0, "fwIoU": 70.0}))
    a, b, c = (x + seed for x in NOVEL_IOU[variant])
    pd.DataFrame([{"id": 0, "name": "sky", "split": "base", "iou": 60.0},
                  {"id": 1, "name": "cat", "split": "novel", "iou": a},
                  {"id": 2, "name": "dog", "split": "novel", "iou": b},
                  {"id": 3, "name": "cow", "split": "novel", "iou": c}]).to_csv(d / "per_class_iou.csv", index=False)
    pd.DataFrame({"step": [5, 10], "loss": [2.0, 1.0], "loss_ce": [1.0, 0.5]}).to_csv(d / "curve.csv", index=False)


@pytest.fixture
def grid_cells(tmp_path):
    from pipeline.report.ablation import load_cells
    root = tmp_path / "cells"
    base = {6: 30.0, 7: 33.0, 8: 29.0}
    for s, b in base.items():
        _write_cell(root, "pp0", s, b)
        _write_cell(root, "full", s, b + {6: 0.4, 7: -0.3, 8: 0.2}[s])       # no change that matters
        _write_cell(root, "full_oracle_teacher", s, b + {6: 12.0, 7: 14.0, 8: 13.0}[s])
    return root, load_cells(root)


def test_paired_and_per_class_differences(grid_cells):
    _, cells = grid_cells
    assert ev.paired_diffs(cells, "full", "pp0") == pytest.approx({(1, 6): 0.4, (1, 7): -0.3, (1, 8): 0.2})
    pcd = ev.per_class_diffs(cells, "full", "pp0")
    assert pcd["name"].tolist() == ["cat", "dog", "cow"]
    assert pcd["diff"].tolist() == pytest.approx([1.0, -1.0, 5.0]) and pcd["seeds"].tolist() == [3, 3, 3]


def test_heldout_frame_and_table(grid_cells):
    _, cells = grid_cells
    frame = ev.heldout_frame(cells, ["pp0", "full"])
    assert len(frame) == 6 and set(ev.HELDOUT_KEYS) <= set(frame.columns)
    md = ev.heldout_markdown(frame, {"full": "oracle teacher"})
    assert "| pp0 | 3 | 0.670 ± 0.010 | 0.570 ± 0.010 |" in md          # novel: SimNet, then the student
    assert "| full (uses novel masks: oracle teacher) | 3 | " in md
    assert "novel: SimNet" in md and "novel vs unlabelled: features" in md


def test_verdict_section_from_the_grid(grid_cells):
    _, cells = grid_cells
    md = ev.similarity_verdict_markdown(cells, {"full_oracle_teacher": "oracle teacher"}, "DATA SETTING")
    assert "| full − pp0 |" in md and "`equivalent`" in md           # endpoint: ±0.5 around 0.1
    assert "| full_oracle_teacher − pp0 |" in md and "**uses novel masks**" in md and "`resolved_up`" in md
    assert "(97.5%)" in md                                         # Bonferroni over 2 comparisons
    assert "**No difference that matters:**" in md
    assert "the headroom exists, the transfer does not (yet) deliver it" in md
    assert "pairs** for 80% power" in md
    assert "2 up, 1 down, 0 tied" in md and "| cow | +5.0 | 3 |" in md
    assert "full_oracle_teacher (uses novel masks: oracle teacher)" in md     # held-out AUC table
    assert "Data setting: DATA SETTING." in md
    assert ev.similarity_verdict_markdown(cells[cells["variant"] != "pp0"]) is None     # no endpoint


def test_verdict_section_states_the_noise_floor_when_complementary_is_in_the_grid(grid_cells):
    """pp0 − +complementary (nothing of SimLoss reaches the model but the clipping): its mean, 95% interval
    and paired SD, beside the paired SDs of the section's two comparisons; absent without +complementary."""
    from pipeline.report.ablation import load_cells
    root, cells = grid_cells
    assert "Noise floor" not in ev.similarity_verdict_markdown(cells)
    for s, b in {6: 30.0, 7: 33.0, 8: 29.0}.items():
        _write_cell(root, "+complementary", s, b - {6: 1.0, 7: 3.0, 8: 2.0}[s])     # pp0 − it: 1, 3, 2
    md = ev.similarity_verdict_markdown(load_cells(root))
    h = 4.302652729911275 * 1.0 / np.sqrt(3)                         # t(2) at 97.5%, sd 1
    sd_end = np.std([0.4, -0.3, 0.2], ddof=1)
    assert (f"yet its novel mIoU differs by 2.0 [{2 - h:.1f}, {2 + h:.1f}] (95%) with a paired SD of 1.0 over 3 "
            f"pairs. Paired SDs of this section's comparisons: full − pp0 {sd_end:.1f}; "
            "full_oracle_teacher − pp0 1.0.") in md


def test_report_has_the_verdict_section_and_novel_mask_notes(grid_cells, tmp_path):
    from pipeline.report import Grid, Inputs, write_report
    from pipeline.report import ablation as ab
    from pipeline.report.build import VERDICT_HEADING
    root, cells = grid_cells
    variants = ["pp0", "full", "full_oracle_teacher"]
    table = ab.ablation_table(cells, variants, baseline="pp0")
    per_class = pd.DataFrame([{"id": 0, "name": "sky", "split": "base", "iou": 60.0, "acc": 70.0,
                               "gt_pixels": 10, "pred_pixels": 10}])
    r = Inputs(title="t", dataset="synthetic", split=1, metrics={"mIoU": 50.0}, per_class=per_class,
               curve=pd.DataFrame({"step": [1, 2], "loss": [2.0, 1.0]}), report_dir=tmp_path,
               figures_dir=tmp_path / "figures", grid=Grid(table, root, variants, [6, 7, 8], 10, cells),
               novel_masks={"full_oracle_teacher": "oracle teacher"}, data_setting="SETTING")
    parts = write_report(r, tmp_path / "report.md", ablation_md=tmp_path / "ablation.md")
    headings = [s.heading for s in parts]
    assert VERDICT_HEADING in headings and headings.index(VERDICT_HEADING) == headings.index("Ablation") + 1
    md = (tmp_path / "report.md").read_text()
    assert "**`full_oracle_teacher` uses novel masks (oracle teacher)**" in md          # ablation note
    diag = next(s for s in parts if s.heading == "Similarity diagnostics").markdown
    assert diag.startswith("After training, on the same 10^5 test pixel pairs")         # the headline
    assert "### During training" not in diag or diag.index("### During training") > diag.index("| variant |")
    assert f"## {VERDICT_HEADING}" in (tmp_path / "ablation.md").read_text()


def test_data_setting_sentence():
    from pipeline.config import build_params
    from pipeline.report.build import data_setting
    from tests.conftest import file_params
    assert "cooccur: 0`" in data_setting(build_params(file_params()))
    assert "50%" in data_setting(build_params(file_params({"data": {"synthetic": {"cooccur": 0.5}}})))
