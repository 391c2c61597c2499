"""The ablation grid over several base/novel splits (``ablation.splits``): validation, the cells it
plans (keys, split folders, initialisations, the main-model sharing rule), a tiny grid over two
splits end to end, and the report pairing two variants' cells by (split, seed)."""
from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from pipeline.ablation import cell_key, cell_params, grid_cells
from pipeline.config import ConfigError, build_ablation, build_params, params_hash
from pipeline.data import catalog
from tests.helpers import ROOT, run_stage, small_params, write_params

RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def _raw(**ablation) -> dict:
    raw = copy.deepcopy(RAW)
    raw["ablation"].update(ablation)
    return raw


def _plan(raw: dict, only=None):
    from pipeline.grid import plan_cells
    main = build_params({k: v for k, v in raw.items() if k != "ablation"})
    jobs, _, _ = plan_cells(main, raw, build_ablation(raw["ablation"]), "main text", dataset_dir=Path("ds"),
                            split_dir=Path("data/split"), init=Path("data/pretrain/init.pt"),
                            main_model=Path("data/train/model.pt"), checkpoints=Path("ck"), out=Path("out"),
                            cores=2, only=only, mlflow=False, progress=False)
    return {j.key: j for j in jobs}


# ----------------------------------------------------------------------------- params
@pytest.mark.parametrize("splits, message", [
    ([1, 5], "params key 'ablation.splits': 5 is not a split of dataset 'synthetic'; allowed values: 1, 2, 3, 4 "
             "(or [] for data.split only)"),
    ([0], "params key 'ablation.splits': 0 is out of range; expected a value >= 1"),
    ([2, 2], "params key 'ablation.splits': [2, 2] repeats a value"),
    (["2"], "params key 'ablation.splits[0]': expected an integer, got '2' (str)"),
])
def test_a_bad_split_is_refused_before_any_work_naming_the_key(tmp_path, capsys, splits, message):
    params = write_params(tmp_path / "params.yaml", _raw(splits=splits))
    rc = run_stage("ablate", "--params", params, "--dataset-dir", tmp_path / "dataset", "--split-dir",
                   tmp_path / "split", "--main-model", tmp_path / "model.pt", "--checkpoints", tmp_path / "ck",
                   "--out", tmp_path / "out", "--no-mlflow", "--no-progress")
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {params}: {message}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]          # nothing made


def test_the_splits_of_the_other_datasets_are_theirs():
    from pipeline.ablation import check_variants
    raw = _raw(splits=[9])
    raw["data"]["dataset"] = "coco_stuff_10k"
    check_variants(raw, build_ablation(raw["ablation"]))                  # COCO-Stuff has 9 splits
    raw["data"]["dataset"] = "ade20k"
    with pytest.raises(ConfigError, match=r"9 is not a split of dataset 'ade20k'; allowed values: 1, 2, 3, 4 "):
        check_variants(raw, build_ablation(raw["ablation"]))
    assert build_ablation(RAW["ablation"]).splits == ()                   # params.yaml: data.split only


# ----------------------------------------------------------------------------- the cells
def test_cells_over_two_splits_and_two_seeds():
    """data.split 1, splits [1, 2] x seeds [6, 7] x variants [baseline, full]: split 1's cells keep the
    names of a grid without splits and read the pipeline's split folder and initialisation; split 2's
    are named with their split and read their own, under the checkpoints folder. Only full-6 (the main
    params: seed 6 = base.seed, full length) shares the main model; full-s2-6 differs by data.split."""
    raw = _raw(splits=[1, 2], seeds=[6, 7], run=["baseline", "full"], iterations=0)
    assert raw["data"]["split"] == 1 and raw["base"]["seed"] == 6
    jobs = _plan(raw)
    assert sorted(jobs) == ["baseline-6", "baseline-7", "baseline-s2-6", "baseline-s2-7",
                            "full-6", "full-7", "full-s2-6", "full-s2-7"]
    assert [k for k, j in jobs.items() if j.shared] == ["full-6"]
    for key, j in jobs.items():
        split = 2 if "-s2-" in key else 1
        assert j.params.data.split == split and j.key_split == (2 if split == 2 else None)
        assert j.checkpoint == Path("ck") / key / "cell.pt" and j.out == Path("out") / key
        if split == 1:
            assert (j.split_dir, j.init) == (Path("data/split"), Path("data/pretrain/init.pt"))
            assert j.run_name == f"{j.variant}-seed{j.seed}" and j.experiment() is None
        else:
            assert (j.split_dir, j.init) == (Path("ck/split-2/split"), Path("ck/split-2/init.pt"))
            assert j.run_name == f"{j.variant}-split2-seed{j.seed}"
            assert j.experiment() == "simformer-synthetic-split1"        # the grid's experiment
    # a cell on split 2 is the same cell as on split 1 but for data.split
    a, b = jobs["full-7"].params, jobs["full-s2-7"].params
    assert a.data.split == 1 and b.data.split == 2 and a.loss == b.loss and a.base == b.base
    # --cell names a split's cell; an unknown one lists the grid's cells
    assert list(_plan(raw, only=["full-s2-7"])) == ["full-s2-7"]
    with pytest.raises(ValueError, match=r"--cell 'full-s3-7' is not a cell of the grid; cells: baseline-6, "
                                         r"baseline-7, baseline-s2-6, baseline-s2-7, full-6"):
        _plan(raw, only=["full-s3-7"])
    # with data.split 2, split 1's cells are the named ones and full-6 on split 2 is the main model
    raw2 = copy.deepcopy(raw)
    raw2["data"]["split"] = 2
    jobs2 = _plan(raw2)
    assert sorted(jobs2) == ["baseline-6", "baseline-7", "baseline-s1-6", "baseline-s1-7",
                             "full-6", "full-7", "full-s1-6", "full-s1-7"]
    assert [k for k, j in jobs2.items() if j.shared] == ["full-6"] and jobs2["full-6"].params.data.split == 2
    assert jobs2["full-s1-6"].split_dir == Path("ck/split-1/split")


# Computed with the code before ablation.splits (main at 868683e: pipeline.ablation.cell_key and
# cell_params, pipeline.config.params_hash) on this params.yaml and the grid below; a grid without
# splits must give these exact keys and hashes (the same folders, checkpoints and MLflow runs). A change
# of params.yaml's training groups changes the hashes: recompute them with that code.
BEFORE = {"baseline-6": "1648f677ec17db2e", "baseline-7": "e9492bf3c75aa92f", "full-6": "c2344e289e7ef1ac",
          "full-7": "170b00d4d02612eb"}


def test_a_grid_without_splits_keeps_its_keys_and_params():
    raw = _raw(splits=[], seeds=[6, 7], run=["baseline", "full"], iterations=0)
    jobs = _plan(raw)
    assert {k: params_hash(j.params) for k, j in jobs.items()} == BEFORE
    grid = build_ablation(raw["ablation"])
    cells = grid_cells(grid, 1)
    assert [c.key for c in cells] == [cell_key(v, s) for v, s in grid.cells()] == list(BEFORE)
    assert all(j.key_split is None and j.run_name == f"{j.variant}-seed{j.seed}" for j in jobs.values())
    for c in cells:         # the same params as without a split argument (what the code before computed)
        assert cell_params(raw, grid, c.variant, c.seed, c.key_split) == cell_params(raw, grid, c.variant, c.seed)
    # listing data.split itself changes nothing either
    assert {k: params_hash(j.params) for k, j in _plan(_raw(splits=[1], seeds=[6, 7], run=["baseline", "full"],
                                                             iterations=0)).items()} == BEFORE


# ----------------------------------------------------------------------------- a tiny grid, end to end
def test_a_tiny_grid_over_two_splits(tiny_data, store, tmp_path, capsys):
    """2 splits x 1 seed x 2 variants, 2 steps each, with a 2-step weak-shot pre-training: split 2's
    split folder and initialisation are made once under the checkpoints folder; each cell evaluates
    its own split's novel classes; the runs carry the split."""
    raw = small_params(model={"pretrained": "weak_shot"}, pretrain={"iterations": 2, "batch_size": 2},
                       train={"iterations": 2, "checkpoint_interval": 2})
    raw["ablation"].update({"seeds": [4], "splits": [1, 2], "iterations": 0, "workers": 1})
    params = write_params(tmp_path / "params.yaml", raw)
    init = tmp_path / "init.pt"
    assert run_stage("pretrain", "--params", params, "--dataset-dir", tiny_data / "dataset", "--split-dir",
                     tiny_data / "split", "--out", init, "--curve", tmp_path / "curve.csv", "--no-progress") == 0
    ck, out = tmp_path / "ck", tmp_path / "out"
    argv = ["--params", params, "--dataset-dir", tiny_data / "dataset", "--split-dir", tiny_data / "split",
            "--init", init, "--main-model", tmp_path / "none.pt", "--checkpoints", ck, "--out", out, "--no-progress"]
    assert run_stage("ablate", *argv) == 0
    said = capsys.readouterr().out
    assert "split 2 (18 base, 6 novel classes): pre-training its weak-shot initialisation (2 steps)" in said
    assert sorted(p.name for p in out.iterdir()) == ["baseline-4", "baseline-s2-4", "full-4", "full-s2-4"]
    assert sorted(p.name for p in ck.iterdir()) == ["baseline-4", "baseline-s2-4", "full-4", "full-s2-4", "split-2"]
    assert sorted(p.name for p in (ck / "split-2").iterdir()) == ["init.pt", "pretrain_curve.csv", "split"]
    assert json.loads((ck / "split-2/split/split.json").read_text())["split"] == 2
    made = torch.load(ck / "split-2/init.pt", map_location="cpu", weights_only=True)
    assert made["used"] is True and made["steps"] == 2 and len(made["pretrain_hash"]) == 16
    assert len(pd.read_csv(ck / "split-2/pretrain_curve.csv")) == 1          # log_interval 10: the last step
    for key, split in (("baseline-4", 1), ("full-4", 1), ("baseline-s2-4", 2), ("full-s2-4", 2)):
        cell = json.loads((out / key / "cell.json").read_text())
        assert (cell["split"], cell["seed"], cell["dataset"]) == (split, 4, "synthetic")
        pc = pd.read_csv(out / key / "per_class_iou.csv")
        assert sorted(pc.loc[pc["split"] == "novel", "id"]) == sorted(catalog.novel_class_ids("synthetic", split))
        if key.startswith("full"):      # full: the main params but for the cell's seed and split
            assert cell["params_hash"] == params_hash(build_params(
                {**{k: v for k, v in raw.items() if k != "ablation"}, "base": {"seed": 4},
                 "data": {**raw["data"], "split": split}}))
    # MLflow: every cell in the grid's experiment (split 1's), with its split as tag and param
    con = sqlite3.connect(store / "mlflow.db")
    try:
        rows = con.execute(
            "select r.name, e.name, t.value, p.value from runs r join experiments e using (experiment_id) "
            "join tags t on t.run_uuid = r.run_uuid and t.key = 'split' "
            "join params p on p.run_uuid = r.run_uuid and p.key = 'data.split'").fetchall()
    finally:
        con.close()
    assert sorted(rows) == [("baseline-seed4", "simformer-synthetic-split1", "1", "1"),
                            ("baseline-split2-seed4", "simformer-synthetic-split1", "2", "2"),
                            ("full-seed4", "simformer-synthetic-split1", "1", "1"),
                            ("full-split2-seed4", "simformer-synthetic-split1", "2", "2")]
    # the report's grid run (stages/report.py): each cell's own run becomes its child, split 2's included
    from pipeline import tracking
    from pipeline.ablation import cell_runs, grid_hash
    grid = build_ablation(raw["ablation"])
    metrics = {k: json.loads((out / k / "metrics.json").read_text()) for k in ("baseline-4", "full-4", "baseline-s2-4",
                                                                              "full-s2-4")}
    runs = cell_runs(raw, grid, metrics)
    assert [(c["name"], c["split"]) for c in runs] == [("baseline-seed4", 1), ("baseline-split2-seed4", 2),
                                                       ("full-seed4", 1), ("full-split2-seed4", 2)]
    synced = tracking.sync_grid(store, "simformer-synthetic-split1", grid_hash([c["params_hash"] for c in runs]),
                                {"cells": 4}, runs, {}, "x: 1\n")
    own = {k: json.loads((out / k / "cell.json").read_text())["run_id"] for k in metrics}
    assert synced["children"] == {"baseline-seed4": own["baseline-4"], "baseline-split2-seed4": own["baseline-s2-4"],
                                  "full-seed4": own["full-4"], "full-split2-seed4": own["full-s2-4"]}
    # the report stage over the two splits (full-4's files stand in for the main model's)
    rep = tmp_path / "report"
    assert run_stage("report", "--params", params, "--metrics", out / "full-4/metrics.json", "--per-class",
                     out / "full-4/per_class_iou.csv", "--curve", out / "full-4/curve.csv", "--cells", out,
                     "--out", rep / "report.md", "--figures", rep / "figures", "--no-mlflow") == 0
    md = (rep / "report.md").read_text()
    assert "- ablation grid: 2 variants × splits 1, 2 × seeds 4; 2 iterations per cell; each split's cells" in md
    assert "| **baseline** | s1: 4; s2: 4 |" in md and "| full | s1: 4; s2: 4 |" in md
    assert "Splits 1, 2 × seeds 4 (2 cells per variant)" in md
    assert "Paired by split and seed, pairs (split, seed)" in md
    # again, one cell: the initialisation is reused (not re-made), the finished cell only evaluated
    before = (ck / "split-2/init.pt").stat().st_mtime_ns
    assert run_stage("ablate", *argv, "--cell", "full-s2-4", "--no-mlflow") == 0
    said = capsys.readouterr().out
    assert f"split 2: reusing its weak-shot initialisation {ck / 'split-2/init.pt'}" in said
    assert "pre-training" not in said and (ck / "split-2/init.pt").stat().st_mtime_ns == before


def test_extra_splits_pre_train_at_once_when_threads_are_fixed(tiny_data, tmp_path, capsys):
    """train.threads fixed (1) on 2 cores: splits 2 and 3 pre-train two at a time in spawned processes,
    and each initialisation is the bits of the same pre-training made alone in this process."""
    from types import SimpleNamespace

    from pipeline.grid import prepare_split, prepare_splits
    raw = small_params(model={"pretrained": "weak_shot"}, pretrain={"iterations": 2, "batch_size": 2})
    main = build_params(raw)
    assert main.train.threads == 1
    jobs = [SimpleNamespace(key_split=k, split_dir=tmp_path / f"s{k}/split", init=tmp_path / f"s{k}/init.pt")
            for k in (3, 2, 3)] + [SimpleNamespace(key_split=None, split_dir=None, init=None)]
    assert prepare_splits(main, jobs, tiny_data / "dataset", progress=False, cores=2) == [2, 3]
    assert "pre-training splits 2, 3: 2 at a time, 1 torch thread each" in capsys.readouterr().out
    assert prepare_split(main, 3, tiny_data / "dataset", tmp_path / "alone/split", tmp_path / "alone/init.pt",
                         progress=False) is True
    alone = torch.load(tmp_path / "alone/init.pt", map_location="cpu", weights_only=True)
    for k in (2, 3):
        made = torch.load(tmp_path / f"s{k}/init.pt", map_location="cpu", weights_only=True)
        assert made["used"] is True and made["steps"] == 2
        assert json.loads((tmp_path / f"s{k}/split/split.json").read_text())["split"] == k
    made = torch.load(tmp_path / "s3/init.pt", map_location="cpu", weights_only=True)
    assert made["pretrain_hash"] == alone["pretrain_hash"]
    for part in ("backbone", "pixel_decoder"):
        assert made[part].keys() == alone[part].keys()
        assert all(torch.equal(made[part][n], alone[part][n]) for n in made[part]), part
    # threads 0 (every core each): one after the other, with their own messages
    seq = build_params(small_params(model={"pretrained": "weak_shot"}, pretrain={"iterations": 2, "batch_size": 2},
                                    train={"threads": 0}))
    jobs = [SimpleNamespace(key_split=4, split_dir=tmp_path / "s4/split", init=tmp_path / "s4/init.pt")]
    assert prepare_splits(seq, jobs, tiny_data / "dataset", progress=False, cores=2) == [4]
    said = capsys.readouterr().out
    assert "at a time" not in said and "split 4 (18 base, 6 novel classes): pre-training" in said


# ----------------------------------------------------------------------------- the report's pairing
# novel mIoU of pp0 per (split, seed); full = pp0 + DIFF. Split 1's novel class is "cat", split 2's "dog".
PP0 = {(1, 6): 30.0, (1, 7): 34.0, (2, 6): 50.0, (2, 7): 41.0}
DIFF = {(1, 6): 1.0, (1, 7): 3.0, (2, 6): -2.0, (2, 7): 6.0}


def _write_cell(root: Path, variant: str, split: int, seed: int, novel: float, main_split: int = 1):
    d = root / cell_key(variant, seed, None if split == main_split else split)
    d.mkdir(parents=True)
    (d / "cell.json").write_text(json.dumps({"variant": variant, "seed": seed, "split": split, "dataset": "synthetic",
                                             "params_hash": f"{variant}{split}{seed}", "iterations": 10}))
    (d / "metrics.json").write_text(json.dumps({"mIoU": 50.0, "mIoU_base": 60.0, "mIoU_novel": novel, "hIoU": 40.0,
                                                "pAcc": 80.0, "mAcc": 60.0, "fwIoU": 70.0}))
    novel_id = {1: 1, 2: 2}[split]       # each class is novel in one split, base in the other
    pd.DataFrame([{"id": 1, "name": "cat", "split": "novel" if novel_id == 1 else "base", "iou": novel + 1},
                  {"id": 2, "name": "dog", "split": "novel" if novel_id == 2 else "base", "iou": novel - 1}]
                 ).to_csv(d / "per_class_iou.csv", index=False)
    pd.DataFrame({"step": [5, 10], "loss": [2.0, 1.0]}).to_csv(d / "curve.csv", index=False)


@pytest.fixture
def two_split_cells(tmp_path):
    from pipeline.report.ablation import load_cells
    root = tmp_path / "cells"
    for (split, seed), b in PP0.items():
        _write_cell(root, "pp0", split, seed, b)
        _write_cell(root, "full", split, seed, b + DIFF[(split, seed)])
    return root, load_cells(root)


def test_the_verdict_pairs_by_split_and_seed(two_split_cells):
    from pipeline.report import evidence as ev
    _, cells = two_split_cells
    assert sorted(cells["key"]) == ["full-6", "full-7", "full-s2-6", "full-s2-7",
                                    "pp0-6", "pp0-7", "pp0-s2-6", "pp0-s2-7"]
    d = ev.paired_diffs(cells, "full", "pp0")
    assert d == pytest.approx(DIFF) and list(d) == [(1, 6), (1, 7), (2, 6), (2, 7)]
    # a cell missing on one split drops only its own pair (pairing by seed alone would mix the splits)
    partial = cells[cells["key"] != "pp0-s2-7"]
    assert ev.paired_diffs(partial, "full", "pp0") == pytest.approx({k: DIFF[k] for k in [(1, 6), (1, 7), (2, 6)]})
    # per class: each class over the seeds of the split where it is novel
    pcd = ev.per_class_diffs(cells, "full", "pp0")
    assert pcd[["name", "splits", "seeds"]].values.tolist() == [["cat", "1", 2], ["dog", "2", 2]]
    assert pcd["diff"].tolist() == pytest.approx([(1.0 + 3.0) / 2, (-2.0 + 6.0) / 2])
    md = ev.similarity_verdict_markdown(cells)
    assert "over splits 1, 2, pairs (split, seed): a pair is the two cells of one split and seed" in md
    assert "| full − pp0 | endpoint: similarity transfer (DistLoss with SimNet's teacher) on vs off | 4 | 2.0 |" in md
    assert "| comparison | what | pairs (split, seed) |" in md
    assert "2 up, 0 down, 0 tied" in md and "| cat | 1 | +2.0 | 2 |" in md and "| dog | 2 | +2.0 | 2 |" in md
    # by split: split 1 pairs +1, +3; split 2 pairs -2, +6 -> means 2 and 2, F = 0 (no between-split spread)
    assert "| full − pp0 | 1 | 2 | 2.0 | 1.4 | 2 of 2 |" in md and "| full − pp0 | 2 | 2 | 2.0 | 5.7 | 1 of 2 |" in md
    assert "Between splits (one-way ANOVA of the paired differences): full − pp0 F(1, 2) = 0.00, p = 1.000." in md
    table = ev.paired_table(cells, comparisons=(("full", "pp0"),), metrics=(("mIoU_novel", "novel mIoU"),))
    assert table["n"].tolist() == [4] and table["mean"].tolist() == pytest.approx([2.0])
    paired = ev.paired_markdown(table)
    assert paired.startswith("Paired by split and seed, pairs (split, seed)") and "| 4 | 2.0 |" in paired


def test_the_grid_tables_pool_splits_and_seeds_and_the_run_section_states_them(two_split_cells, tmp_path):
    from pipeline.report import Grid, Inputs
    from pipeline.report import ablation as ab
    from pipeline.report.build import run_section
    root, cells = two_split_cells
    table = ab.ablation_table(cells, ["pp0", "full"], baseline="pp0")
    full = table.set_index("variant").loc["full"]
    assert full["n"] == 4 and full["mIoU_novel_mean"] == pytest.approx(sum(PP0.values()) / 4 + 2.0)
    assert full["splits"] == [1, 1, 2, 2] and full["seeds"] == [6, 7, 6, 7]
    md = ab.ablation_markdown(table)
    assert "Splits 1, 2 × seeds 6, 7 (4 cells per variant)" in md and "**pooled over splits and seeds**" in md
    assert "| variant | split: seeds |" in md and "| full | s1: 6, 7; s2: 6, 7 |" in md
    r = Inputs(title="t", dataset="synthetic", split=1, metrics={}, per_class=pd.DataFrame(),
               curve=pd.DataFrame(), report_dir=tmp_path, figures_dir=tmp_path / "figures",
               grid=Grid(table, root, ["pp0", "full"], [6, 7], 10, cells, [1, 2]))
    text = run_section(r).markdown
    assert ("- ablation grid: 2 variants × splits 1, 2 × seeds 6, 7; 10 iterations per cell; each split's cells "
            "start from that split's own weak-shot pre-training (split 1's: the pipeline's); the grid's means pool "
            "splits and seeds, its paired differences pair by (split, seed)") in text
