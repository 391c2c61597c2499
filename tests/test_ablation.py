import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.ablation import REQUIRED_VARIANTS, cell_key, cell_params, grid_hash, pp_weight_sweep, shares_main_training
from pipeline.config import ConfigError, build_ablation, build_params
from tests.helpers import ROOT

RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_default_grid_declares_the_paper_variants_and_trains_the_ordered_ones_over_three_seeds():
    grid = build_ablation(RAW["ablation"])
    assert set(REQUIRED_VARIANTS) <= set(grid.variants)
    assert list(grid.trained) == list(grid.run) == ["baseline", "+complementary", "full"]
    assert len(grid.seeds) >= 3
    assert grid.cells()[:2] == [("baseline", grid.seeds[0]), ("baseline", grid.seeds[1])]
    # the sweep variants differ from full SimFormer only by the DistLoss weight
    for name, w in (("pp0", 0.0), ("pp0_1", 0.1), ("pp1", 1.0), ("pp3", 3.0)):
        assert cell_params(RAW, grid, name, 6).loss.pp_weight == w
        assert cell_params(RAW, grid, name, 6).loss.comp_weight == cell_params(RAW, grid, "full", 6).loss.comp_weight
    # ... and the report finds exactly those (+complementary also drops SimLoss; pp_warmup changes pp_start)
    sweep = build_ablation({**RAW["ablation"], "run": ["baseline", "+complementary", "full", "pp0", "pp1", "pp3",
                                                       "pp_warmup", "simnet_released"]})
    assert pp_weight_sweep(RAW, sweep) == {"full": 0.3, "pp0": 0.0, "pp1": 1.0, "pp3": 3.0}
    assert pp_weight_sweep(RAW, build_ablation({**RAW["ablation"], "run": ["baseline", "pp1"]})) == {}


@pytest.mark.parametrize("run, message", [
    ([], "'ablation.run': expected a non-empty list of strings, got []"),
    (["full", "full"], "'ablation.run': ['full', 'full'] repeats a value"),
    (["ful"], "'ablation.run': 'ful' is not a variant of ablation.variants"),
    ([0.3], "'ablation.run[0]': expected a string, got 0.3 (float)"),
])
def test_bad_run_list_names_the_key(run, message):
    with pytest.raises(ConfigError) as e:
        build_ablation({"seeds": [6], "splits": [], "iterations": 0, "workers": 1, "run": run, "variants": {"full": {}},
                        "executor": "local", "slurm": RAW["ablation"]["slurm"]})
    assert message in str(e.value)


def test_cell_params_apply_overrides_seed_and_iterations():
    grid = build_ablation(RAW["ablation"])
    base = cell_params(RAW, grid, "baseline", 7)
    assert (base.loss.comp_weight, base.loss.sim_weight, base.loss.pp_weight) == (0.0, 0.0, 0.0)
    assert base.base.seed == 7
    assert base.train.iterations == (grid.iterations or RAW["train"]["iterations"])   # 0 = the main length
    assert base.loss.cls_weight == RAW["loss"]["cls_weight"]           # untouched keys stay
    oracle = cell_params(RAW, grid, "oracle", 6)
    assert oracle.loss.oracle is True
    full = cell_params(RAW, grid, "full", 6)
    assert full.loss.pp_weight == RAW["loss"]["pp_weight"]


def test_full_cell_shares_main_training_only_when_params_equal():
    main = build_params({k: v for k, v in RAW.items() if k != "ablation"})
    same = build_ablation({**RAW["ablation"], "iterations": 0, "seeds": [RAW["base"]["seed"], 99]})
    assert shares_main_training(main, cell_params(RAW, same, "full", RAW["base"]["seed"]))
    assert not shares_main_training(main, cell_params(RAW, same, "full", 99))
    assert not shares_main_training(main, cell_params(RAW, same, "baseline", RAW["base"]["seed"]))


@pytest.mark.parametrize("ablation, message", [
    ({"seeds": [6, 6], "iterations": 0, "workers": 1, "run": ["a"], "variants": {"a": {}}}, "'ablation.seeds': [6, 6] repeats a value"),
    ({"seeds": "6", "iterations": 0, "workers": 1, "run": ["a"], "variants": {"a": {}}}, "'ablation.seeds': expected a non-empty list of integers"),
    ({"seeds": [6], "splits": [], "iterations": 0, "workers": 1, "run": ["a b"], "variants": {"a b": {}}, "executor": "local",
      "slurm": RAW["ablation"]["slurm"]}, "variant name 'a b' must be a non-empty string"),
    ({"seeds": [6], "splits": [], "workers": 1, "run": ["a"], "variants": {"a": {}}}, "params key 'ablation.iterations' is missing"),
    ({"seeds": [6], "variant": {}}, "unknown params key 'ablation.variant'. Did you mean 'ablation.variants'?"),
    ({"seeds": [6], "splits": [], "iterations": -1, "workers": 1, "run": ["a"], "variants": {"a": {}}}, "'ablation.iterations': -1 is out of range; expected a value >= 0"),
    ({"seeds": [6], "splits": [], "iterations": 0, "workers": 0, "run": ["a"], "variants": {"a": {}}}, "'ablation.workers': 0 is out of range; expected a value >= 1"),
    ({"seeds": [6], "splits": [], "iterations": 0, "workers": "2", "run": ["a"], "variants": {"a": {}}}, "'ablation.workers': expected an integer, got '2' (str)"),
    ({"seeds": [6], "splits": [], "iterations": 0, "run": ["a"], "variants": {"a": {}}}, "params key 'ablation.workers' is missing"),
])
def test_bad_grid_structure(ablation, message):
    with pytest.raises(ConfigError) as e:
        build_ablation(ablation)
    assert message in str(e.value)


def test_bad_override_names_variant_and_key():
    grid = build_ablation({"seeds": [6], "splits": [], "iterations": 0, "workers": 1, "run": ["typo"],
                           "variants": {"typo": {"loss": {"pp_wieght": 0.5}}},
                           "executor": "local", "slurm": RAW["ablation"]["slurm"]})
    with pytest.raises(ConfigError) as e:
        cell_params(RAW, grid, "typo", 6)
    assert str(e.value).startswith("ablation variant 'typo': unknown params key 'loss.pp_wieght'")


def test_grid_hash_is_order_free_and_content_sensitive():
    assert grid_hash(["a", "b"]) == grid_hash(["b", "a"]) != grid_hash(["a", "c"])
    assert cell_key("+complementary", 6) == "+complementary-6"


def test_dvc_runs_the_whole_grid_in_one_stage():
    """One `ablate` stage trains every cell (ablation.workers at a time) and depends on the whole
    `ablation` group: a changed variant re-runs it, and its finished cells are only evaluated again."""
    dvc = Path(sys.executable).parent / "dvc"
    out = subprocess.run([str(dvc), "stage", "list", "--name-only"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["download", "prepare", "baselines", "pretrain", "train", "evaluate", "retrain", "ablate", "report"]
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["ablate"]
    assert "ablation" in stage["params"] and "matrix" not in stage
    assert stage["outs"][0] == "data/ablation"
    assert stage["outs"][1] == {"data/checkpoints_ablation": {"persist": True, "cache": False}}
