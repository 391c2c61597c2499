"""Ablation report (tables, figures, HTML, qualitative figure) from a small hand-made cells folder."""
import json
import math
import struct

import numpy as np
import pandas as pd
import pytest

from pipeline.report.ablation import (
    AblationError,
    ablation_markdown,
    ablation_notes,
    ablation_summary,
    ablation_table,
    grid_cells,
    load_cells,
    novel_class_iou,
    novel_class_markdown,
    plot_novel_class_iou,
    plot_variant_curves,
)
from pipeline.report.html import markdown_to_html, render_html

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEEDS = (6, 7)
# Caller's order on purpose not alphabetical ("+complementary" < "baseline" < "full").
VARIANTS = ["baseline", "full", "+complementary"]

# (mIoU_base, mIoU_novel, mIoU, hIoU) per cell.
SUMMARY = {
    ("baseline", 6): (40.0, 10.0, 30.0, 16.0),
    ("baseline", 7): (42.0, 14.0, 33.0, 21.0),
    ("full", 6): (45.0, 20.0, 38.0, 27.0),
    ("full", 7): (48.0, 26.0, 40.0, 33.0),
    ("+complementary", 6): (39.0, 15.0, 30.0, 21.0),
    ("+complementary", 7): (40.0, 16.2, 31.0, 23.0),
}
# novel-class IoU per cell: cat (id 2), dog (id 3); None = class absent.
NOVEL_IOU = {
    ("baseline", 6): (10.0, None), ("baseline", 7): (20.0, None),
    ("full", 6): (30.0, 5.0), ("full", 7): (50.0, 15.0),
    ("+complementary", 6): (25.0, None), ("+complementary", 7): (None, 8.0),
}


def _write_cell(root, variant, seed, summary, novel, dataset="synthetic"):
    d = root / f"{variant}-{seed}"
    d.mkdir(parents=True)
    (d / "cell.json").write_text(json.dumps({"variant": variant, "seed": seed, "params_hash": f"h{seed}",
                                             "shared_with_main": False, "dataset": dataset, "split": 1,
                                             "iterations": 50}))
    b, n, m, h = summary
    (d / "metrics.json").write_text(json.dumps({
        "mIoU": m, "mIoU_base": b, "mIoU_novel": n, "hIoU": h,
        "pAcc": 80.0, "mAcc": 60.0, "fwIoU": 70.0}))
    cat, dog = novel
    pd.DataFrame([
        {"id": 0, "name": "sky", "split": "base", "iou": 60.0, "acc": 70.0, "gt_pixels": 100, "pred_pixels": 90},
        {"id": 1, "name": "road", "split": "base", "iou": 50.0, "acc": 60.0, "gt_pixels": 100, "pred_pixels": 90},
        {"id": 2, "name": "cat", "split": "novel", "iou": cat, "acc": 1.0, "gt_pixels": 10, "pred_pixels": 9},
        {"id": 3, "name": "dog", "split": "novel", "iou": dog, "acc": 1.0, "gt_pixels": 10, "pred_pixels": 9},
    ]).to_csv(d / "per_class_iou.csv", index=False)
    steps = np.arange(0, 40, 2)
    offset = {"baseline": 3.0, "full": 2.0, "+complementary": 2.5}[variant] + 0.1 * seed
    pd.DataFrame({"step": steps, "loss": offset + 5.0 / (1 + steps), "loss_ce": 1.0 / (1 + steps),
                  "lr": 1e-4, "images_per_s": 10.0}).to_csv(d / "curve.csv", index=False)
    return d


@pytest.fixture
def cells(tmp_path):
    root = tmp_path / "ablation"
    for (v, s), summary in SUMMARY.items():
        _write_cell(root, v, s, summary, NOVEL_IOU[(v, s)])
    (root / ".full-8.tmp").mkdir()  # an atomic_dir leftover: never a cell
    return root


def _rows(md):
    return [line for line in md.splitlines() if line.startswith("| ")]


def test_load_cells_rows(cells):
    df = load_cells(cells)
    assert len(df) == 6
    assert sorted(zip(df["variant"], df["seed"])) == sorted(SUMMARY)
    r = df.set_index(["variant", "seed"]).loc[("+complementary", 7)]
    assert (r["mIoU_base"], r["mIoU_novel"], r["mIoU"], r["hIoU"]) == SUMMARY[("+complementary", 7)]
    assert r["dataset"] == "synthetic" and r["params_hash"] == "h7" and r["iterations"] == 50


def test_ablation_markdown_exact_numbers(cells):
    table = ablation_table(load_cells(cells), VARIANTS)
    assert table["variant"].tolist() == VARIANTS
    md = ablation_markdown(table, dataset="synthetic")
    rows = _rows(md)
    assert rows[0] == ("| variant | seeds | mIoU base | Δ | mIoU novel | Δ | mIoU | Δ | hIoU | Δ |")
    # Hand computation (sample std of two values a, b = |a - b| / sqrt(2)):
    # baseline base 40, 42 -> 41.0 ± 1.414; novel 10, 14 -> 12.0 ± 2.828; mIoU 30, 33 -> 31.5 ± 2.121;
    #          hIoU 16, 21 -> 18.5 ± 3.536
    assert rows[2] == "| **baseline** | 6, 7 | 41.0 ± 1.4 | — | 12.0 ± 2.8 | — | 31.5 ± 2.1 | — | 18.5 ± 3.5 | — |"
    # full base 45, 48 -> 46.5 ± 2.121 (Δ 46.5 - 41 = +5.5); novel 20, 26 -> 23.0 ± 4.243 (Δ +11.0);
    #      mIoU 38, 40 -> 39.0 ± 1.414 (Δ +7.5); hIoU 27, 33 -> 30.0 ± 4.243 (Δ +11.5)
    assert rows[3] == "| full | 6, 7 | 46.5 ± 2.1 | +5.5 | 23.0 ± 4.2 | +11.0 | 39.0 ± 1.4 | +7.5 | 30.0 ± 4.2 | +11.5 |"
    # +complementary base 39, 40 -> 39.5 ± 0.707 (Δ -1.5); novel 15, 16.2 -> 15.6 ± 0.849 (Δ +3.6);
    #      mIoU 30, 31 -> 30.5 ± 0.707 (Δ -1.0); hIoU 21, 23 -> 22.0 ± 1.414 (Δ +3.5)
    # inside the seed spread (|Δ| <= the larger std of the row and the baseline), marked †:
    #      mIoU |-1.0| <= max(0.707, 2.121); hIoU 3.5 <= max(1.414, 3.536); base 1.5 > max(0.707, 1.414)
    assert rows[4] == ("| +complementary | 6, 7 | 39.5 ± 0.7 | -1.5 | 15.6 ± 0.8 | +3.6 | 30.5 ± 0.7 | -1.0† "
                       "| 22.0 ± 1.4 | +3.5† |")
    assert len(rows) == 5
    assert "Seeds used: 6, 7 (2 per variant)" in md
    assert "Reference bound" not in md and "44.5" not in md
    # the numbers behind the text
    full = table.set_index("variant").loc["full"]
    assert full["n"] == 2 and full["seeds"] == [6, 7]
    assert full["mIoU_base_std"] == pytest.approx(3 / math.sqrt(2))
    assert full["mIoU_novel_diff"] == pytest.approx(11.0)


def test_single_seed_and_null_metric(cells, tmp_path):
    import shutil

    shutil.rmtree(cells / "full-7")
    m = json.loads((cells / "+complementary-7" / "metrics.json").read_text())
    m["mIoU_novel"] = None
    (cells / "+complementary-7" / "metrics.json").write_text(json.dumps(m))
    table = ablation_table(load_cells(cells), VARIANTS)
    rows = _rows(ablation_markdown(table))
    # full: one seed (45, 20, 38, 27) -> no std; Δ 45 - 41 = +4.0, 20 - 12 = +8.0, 38 - 31.5 = +6.5, 27 - 18.5 = +8.5
    assert rows[3] == "| full | 6 | 45.0 ± n/a | +4.0 | 20.0 ± n/a | +8.0 | 38.0 ± n/a | +6.5 | 27.0 ± n/a | +8.5 |"
    # +complementary novel: seed 7 is null -> mean of seed 6 alone, 15.0, Δ +3.0
    assert "| 15.0 ± n/a | +3.0 |" in rows[4]
    assert table.set_index("variant").loc["+complementary", "n"] == 2


def test_no_baseline_gives_na_differences(cells):
    table = ablation_table(load_cells(cells), ["full"], baseline="missing")
    row = _rows(ablation_markdown(table))[2]
    assert row == "| full | 6, 7 | 46.5 ± 2.1 | n/a | 23.0 ± 4.2 | n/a | 39.0 ± 1.4 | n/a | 30.0 ± 4.2 | n/a |"
    # baseline taken from the cells even when it is not a listed variant
    table = ablation_table(load_cells(cells), ["full"])
    assert _rows(ablation_markdown(table))[2].split(" | ")[3] == "+5.5"


@pytest.mark.parametrize("dataset,bound", [("ade20k", "44.5"), ("coco_stuff_10k", "37.1")])
def test_reference_bound_marked_as_published(cells, dataset, bound):
    table = ablation_table(load_cells(cells), VARIANTS)
    md = ablation_markdown(table, dataset=dataset)
    head, ref = md.split("### Reference bound (published, not a project result)")
    assert bound not in head                      # never inside the project's own rows
    ref_rows = _rows(ref)
    assert ref_rows[2] == (f"| MaskFormer R50, fully supervised (published reference) | — | — | — | — | — "
                           f"| {bound} | — | — | — |")
    assert "not run by this pipeline" in ref


def test_notes_say_what_the_numbers_are_worth(cells):
    table = ablation_table(load_cells(cells), VARIANTS)
    notes = ablation_notes(table, cell_iterations=50, main_iterations=600)
    assert len(notes) == 2
    assert notes[0].startswith("**A quick look, not a result.** Each grid cell trained 50 iterations, the main "
                               "model 600")
    # 8 differences (2 variants x 4 metrics); inside the spread: +complementary mIoU and hIoU
    assert notes[1].startswith("**2 of 8 differences are inside the seed spread** (marked †")
    assert ablation_notes(table, 600, 600) == notes[1:]                 # cells as long as the main model
    md = ablation_markdown(table, notes=notes)
    assert md.startswith("> **A quick look, not a result.**") and "\n\n> **2 of 8 differences" in md
    one_seed = ablation_table(load_cells(cells).query("seed == 6"), VARIANTS)
    assert [n[:13] for n in ablation_notes(one_seed)] == ["**One seed** "]
    page = render_html("t", [("Ablation", md)])
    assert page.count("<blockquote>") == 2 and "<strong>A quick look, not a result.</strong>" in page


def test_summary_is_the_dvc_metrics_file(cells):
    summary = ablation_summary(ablation_table(load_cells(cells), VARIANTS))
    assert list(summary) == VARIANTS
    assert summary["full"]["mIoU_novel"] == {"mean": 23.0, "std": round(6 / math.sqrt(2), 4), "n": 2}
    assert summary["+complementary"]["mIoU_base"] == {"mean": 39.5, "std": round(1 / math.sqrt(2), 4), "n": 2}
    one = ablation_summary(ablation_table(load_cells(cells).query("seed == 6"), ["full"]))
    assert one == {"full": {"mIoU_base": {"mean": 45.0, "std": None, "n": 1},
                            "mIoU_novel": {"mean": 20.0, "std": None, "n": 1},
                            "mIoU": {"mean": 38.0, "std": None, "n": 1}, "hIoU": {"mean": 27.0, "std": None, "n": 1}}}
    json.dumps(one, allow_nan=False)                                    # strict JSON


def test_grid_cells_keeps_the_grid_and_names_missing_cells(cells):
    df = grid_cells(cells, [("full", 7), ("baseline", 6)])
    assert list(zip(df["variant"], df["seed"])) == [("full", 7), ("baseline", 6)]
    with pytest.raises(FileNotFoundError, match=r"missing from '.*': full-9, oracle-6 \(run `dvc repro`"):
        grid_cells(cells, [("full", 9), ("full", 6), ("oracle", 6)])


def test_centred_smoothing_and_autoscaled_axes():
    from pipeline.report.figures import _axis_max, _smooth, smoothing_label

    s = _smooth(pd.Series([0.0, 3.0, 6.0, 9.0, 12.0]), 3)
    assert s.tolist() == [1.5, 3.0, 6.0, 9.0, 10.5]          # centred: the mean of the point and its neighbours
    assert smoothing_label([10, 20, 30, 40], 10) == "centred moving average over 10 logged points (100 steps)"
    assert _axis_max([3.0, 12.0, float("nan")]) == pytest.approx(13.2)
    assert _axis_max([95.0]) == 100.0 and _axis_max([float("nan")]) == 1.0


def test_unknown_variant_is_an_error(cells):
    with pytest.raises(AblationError, match="oracle"):
        ablation_table(load_cells(cells), VARIANTS + ["oracle"])


def test_missing_metrics_file_named(cells):
    (cells / "full-7" / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"full-7[/\\]metrics\.json"):
        load_cells(cells)


def test_invalid_files_named(cells):
    (cells / "full-6" / "metrics.json").write_text("{not json")
    with pytest.raises(AblationError, match=r"full-6[/\\]metrics\.json"):
        load_cells(cells)
    (cells / "full-6" / "metrics.json").write_text(json.dumps({"mIoU": 1.0}))
    with pytest.raises(AblationError, match=r"full-6[/\\]metrics\.json.*mIoU_base"):
        load_cells(cells)
    (cells / "full-6" / "metrics.json").write_text(json.dumps({k: 1.0 for k in
                                                               ("mIoU", "mIoU_base", "mIoU_novel", "hIoU",
                                                                "pAcc", "mAcc", "fwIoU")}))
    (cells / "full-6" / "cell.json").write_text(json.dumps({"variant": "full", "seed": 9}))
    with pytest.raises(AblationError, match="full-9"):
        load_cells(cells)


def test_novel_class_iou_means(cells):
    df = novel_class_iou(cells, VARIANTS)
    assert df.columns.tolist() == ["id", "name"] + VARIANTS
    assert df["name"].tolist() == ["cat", "dog"]
    cat, dog = df.iloc[0], df.iloc[1]
    assert (cat["baseline"], cat["full"], cat["+complementary"]) == (15.0, 40.0, 25.0)  # (10+20)/2, (30+50)/2, 25
    assert math.isnan(dog["baseline"]) and dog["full"] == 10.0 and dog["+complementary"] == 8.0
    md = novel_class_markdown(df)
    assert "| 2 | cat | 15.0 | 40.0 | 25.0 |" in md
    assert "| 3 | dog | n/a | 10.0 | 8.0 |" in md


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


def test_figures_and_html(cells, tmp_path):
    novel = novel_class_iou(cells, VARIANTS)
    bars = plot_novel_class_iou(novel, tmp_path / "fig" / "novel.png")
    curves = plot_variant_curves(cells, VARIANTS, tmp_path / "fig" / "curves.png", smoothing=3)
    for p in (bars, curves):
        w, h = _png_size(p)
        assert w > 100 and h > 100
    assert not [p.name for p in (tmp_path / "fig").iterdir() if p.name.startswith(".")]  # no temp left

    md = ablation_markdown(ablation_table(load_cells(cells), VARIANTS), dataset="ade20k")
    page = render_html("SimFormer <ablation>", [("Ablation", md), ("Novel classes", novel_class_markdown(novel)
                                                                   + "\n![Novel-class IoU](fig/novel.png)\n")],
                       {"Novel-class IoU": bars, "Loss curves": curves})
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>SimFormer &lt;ablation&gt;</title>" in page
    assert page.count("data:image/png;base64,") == 2
    import base64
    for p in (bars, curves):
        assert base64.b64encode(p.read_bytes()).decode() in page
    assert 'src="fig/novel.png"' not in page                      # embedded, not linked
    assert '<td style="text-align:right">46.5 ± 2.1</td>' in page
    assert '<td style="text-align:right">+5.5</td>' in page
    assert '<td style="text-align:left"><strong>baseline</strong></td>' in page
    assert "<td style=\"text-align:right\">44.5</td>" in page
    assert "<h3>Reference bound (published, not a project result)</h3>" in page
    with pytest.raises(FileNotFoundError, match="gone.png"):
        render_html("x", [], {"gone": tmp_path / "gone.png"})


def test_markdown_to_html_escapes_and_converts():
    md = ("# Title <x>\n\nSome **bold** and `a<b>` text\ncontinued.\n\n- item & one\n- two\n\n"
          "| a | b \\| c |\n| :--- | ---: |\n| <script> | 1.5 |\n\n![missing](nowhere.png)\n")
    out = markdown_to_html(md)
    assert "<h1>Title &lt;x&gt;</h1>" in out
    assert "<p>Some <strong>bold</strong> and <code>a&lt;b&gt;</code> text continued.</p>" in out
    assert "<ul>\n<li>item &amp; one</li>\n<li>two</li>\n</ul>" in out
    assert '<th style="text-align:right">b | c</th>' in out
    assert '<td style="text-align:left">&lt;script&gt;</td><td style="text-align:right">1.5</td>' in out
    assert "<script>" not in out
    assert 'class="missing"' in out and "<img" not in out


# --------------------------------------------------------------------------- qualitative
def _tiny_model(k):
    import torch

    from pipeline.config import ModelConfig
    from pipeline.model import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="resnet18", pretrained="none", freeze_bn=False, dropout=0.1,
                                   hidden_dim=32, num_queries=5, nheads=2, dec_layers=2, transformer_in="res5", dim_feedforward=64,
                                   conv_dim=32, mask_dim=16, gn_groups=8), num_classes=k)


def test_qualitative_figure_png_grows_with_top_k(tmp_path):
    from pipeline.report.qualitative import qualitative_figure

    k = 4
    model = _tiny_model(k)
    model.train()
    rng = np.random.default_rng(0)
    images = [(f"img{i}", rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8),
               rng.integers(0, k, size=(48, 64)).astype(np.uint8)) for i in range(2)]
    images[1][2][:4] = 255  # ignore pixels
    names = ["sky", "road", "cat", "dog"]
    colors = np.array([[70, 130, 180], [128, 64, 128], [220, 20, 60], [0, 142, 0]], dtype=np.uint8)
    p1 = qualitative_figure(model, images, names, colors, [2, 3], tmp_path / "q1.png", top_k=1)
    p3 = qualitative_figure(model, images, names, colors, [2, 3], tmp_path / "q3.png", top_k=3)
    (w1, h1), (w3, h3) = _png_size(p1), _png_size(p3)
    assert w3 > w1 and h3 == h1
    assert model.training                                     # mode restored
    with pytest.raises(ValueError, match="class names"):
        qualitative_figure(model, images, names[:3], colors, [2], tmp_path / "bad.png")


def test_top_proposals_ranking_and_novel_mark():
    import torch

    from pipeline.report.qualitative import _class_label, colorize, top_proposals

    # 3 queries, K = 2 (+ no-object): best non-no-object probabilities 0.3, 0.6, 0.5
    probs = torch.tensor([[0.3, 0.1, 0.6], [0.2, 0.6, 0.2], [0.5, 0.1, 0.4]])
    assert top_proposals(probs, 2) == [(1, 1, pytest.approx(0.6)), (2, 0, pytest.approx(0.5))]
    assert [q for q, _, _ in top_proposals(probs, 5)] == [1, 2, 0]
    assert _class_label(1, ["sky", "cat"], {1}) == "cat*" and _class_label(0, ["sky", "cat"], {1}) == "sky"
    lab = np.array([[0, 1], [255, 1]])
    out = colorize(lab, [[10, 20, 30], [40, 50, 60]])
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [40, 50, 60]
