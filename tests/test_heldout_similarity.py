"""Held-out similarity diagnostics (pipeline/engine/heldout.py): the fixed test pixel pairs, the AUCs
of SimNet / student / features, their capture from an evaluation's forward passes, and a grid cell
that records them."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import build_params
from pipeline.data import IGNORE
from pipeline.engine import heldout as H
from tests.conftest import file_params

torch.set_num_threads(1)

TINY = {"base": {"seed": 3},
        "data": {"crop_size": 64, "scale_min": 0.5, "scale_max": 1.5,
                 "synthetic": {"num_train": 8, "num_test": 6, "image_size": 64}},
        "model": {"pretrained": "none", "hidden_dim": 32, "num_queries": 8, "nheads": 2, "dec_layers": 2,
                  "dim_feedforward": 64, "conv_dim": 32, "mask_dim": 32, "gn_groups": 8},
        "loss": {"sim_points": 10, "sim_base_points": 8, "pp_points": 10},
        "train": {"iterations": 2, "batch_size": 4, "checkpoint_interval": 2, "log_interval": 1, "threads": 1,
                  "diagnostics_interval": 0, "freeze": "none", "warmup": 0, "device": "cpu"},
        "eval": {"device": "cpu"}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline.data.splits import build_split
    from pipeline.data.synthetic import generate_dataset
    root = tmp_path_factory.mktemp("heldout")
    p = build_params(file_params(TINY))
    generate_dataset(root / "dataset", p.data.synthetic, p.base.seed, progress=False)
    split, index = build_split(root / "dataset", "synthetic", 1, workers=1, progress=False)
    return root, p, split, index


def _model(p, split, seed=0):
    from pipeline.model import build_model
    torch.manual_seed(seed)
    return build_model(p.model, split["num_classes"], None).eval()


def _simnet(p, split):
    from pipeline.losses.build import build_criterion
    torch.manual_seed(1)
    return build_criterion(p, split["num_classes"], split["base"], split["novel"]).similarity.simnet


# ------------------------------------------------------------------ the pairs
def _hand_labels():
    """Three 8 x 8 feature maps: image 0 base 0 | base 1 | novel 5 | 255; image 1 novel 5 | novel 6;
    image 2 base 0 | novel 6 | 255, with a padded (outside) last column."""
    a = np.zeros((8, 8), np.int64)
    a[:, 2:4], a[:, 4:6], a[:, 6:] = 1, 5, IGNORE
    b = np.full((8, 8), 5, np.int64)
    b[4:] = 6
    c = np.zeros((8, 8), np.int64)
    c[:, 3:6], c[:, 6:] = 6, IGNORE
    inside = [np.ones((8, 8), bool), np.ones((8, 8), bool), np.ones((8, 8), bool)]
    inside[2][:, 7] = False
    return [a, b, c], inside


def test_pairs_follow_their_pool_rules():
    labels, inside = _hand_labels()
    pr = H.sample_heldout_pairs(labels, inside, [0, 1], [5, 6], seed=4, pairs=5000)
    la = np.array([labels[i].reshape(-1)[p] for i, p in zip(pr["img_a"], pr["pix_a"])])
    lb = np.array([labels[i].reshape(-1)[p] for i, p in zip(pr["img_b"], pr["pix_b"])])
    ins_b = np.array([inside[i].reshape(-1)[p] for i, p in zip(pr["img_b"], pr["pix_b"])])
    assert np.array_equal(pr["within"], pr["img_a"] == pr["img_b"])
    assert not np.any((pr["img_a"] == pr["img_b"]) & (pr["pix_a"] == pr["pix_b"]))     # never a pixel with itself
    pool = np.array(H.POOLS)[pr["pool"]]
    base, novel = np.isin(la, [0, 1]) & np.isin(lb, [0, 1]), np.isin(la, [5, 6])
    assert np.all(base[pool == "base_same"] & (la == lb)[pool == "base_same"])
    assert np.all(base[pool == "base_diff"] & (la != lb)[pool == "base_diff"])
    assert np.all(novel[pool == "novel_same"] & (la == lb)[pool == "novel_same"])
    assert np.all(novel[pool == "novel_diff"] & np.isin(lb, [5, 6])[pool == "novel_diff"]
                  & (la != lb)[pool == "novel_diff"])
    u = pool == "novel_unlabelled"
    assert np.all(novel[u] & (lb[u] == IGNORE) & ins_b[u])              # unlabelled inside the image, never padding
    for name in H.POOLS:        # every pool filled, half within one image, half across two
        m = pool == name
        assert m.sum() == 1000 and pr["within"][m].sum() == 500, name


def test_pairs_are_a_fixed_draw():
    labels, inside = _hand_labels()
    a = H.sample_heldout_pairs(labels, inside, [0, 1], [5, 6], seed=4, pairs=500)
    b = H.sample_heldout_pairs(labels, inside, [0, 1], [5, 6], seed=4, pairs=500)
    c = H.sample_heldout_pairs(labels, inside, [0, 1], [5, 6], seed=5, pairs=500)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_feature_labels_of_a_padded_input():
    lab = np.full((40, 70), 3, np.uint8)
    lab[:4, :4] = IGNORE
    fl, fi = H.feature_labels(lab)
    assert fl.shape == fi.shape == (64 // 4, 96 // 4)          # padded to 64 x 96, stride 4
    assert fi[:10, :18].all() and not fi[10:].any() and not fi[:, 18:].any()
    assert fl[0, 0] == IGNORE and fl[5, 5] == 3 and (fl[~fi] == IGNORE).all()


def test_the_default_draw_scores_at_least_1e5_pairs(tiny):
    root, p, split, index = tiny
    hp = H.HeldoutPairs(root / "dataset", index, split)
    assert H.HELDOUT_PAIRS >= 100_000 and len(hp.pairs["pool"]) >= 0.99 * H.HELDOUT_PAIRS
    assert np.bincount(hp.pairs["pool"]).min() > 0


# ------------------------------------------------------------------ scoring
def test_heldout_similarity_keys_and_ranges(tiny):
    root, p, split, index = tiny
    model = _model(p, split)
    out = H.heldout_similarity(model, _simnet(p, split), root / "dataset", index, split, pairs=3000)
    assert set(H.METRIC_KEYS) <= set(out)
    assert all(0.0 <= out[k] <= 1.0 for k in H.METRIC_KEYS)
    assert {out[f"heldout_pairs_{k}"] for k in H.KINDS} == {1200.0}
    no_simnet = H.heldout_similarity(model, None, root / "dataset", index, split, pairs=3000)
    assert all(math.isnan(no_simnet[H.metric_key("simnet", k)]) for k in H.KINDS)
    assert no_simnet[H.metric_key("feature", "novel")] == out[H.metric_key("feature", "novel")]


def test_scores_are_the_auc_of_the_scorers(tiny):
    """The feature AUC of the novel kind, recomputed by hand from the model's mask features."""
    from pipeline.engine.diagnostics import pair_auc
    root, p, split, index = tiny
    model = _model(p, split)
    hp = H.HeldoutPairs(root / "dataset", index, split, pairs=2000)
    out = hp.score(None, model)
    from pipeline.data.dataset import read_image
    feats = {}
    with torch.no_grad():
        for n, e in enumerate(index["test"]):
            img = torch.from_numpy(read_image(root / "dataset" / e["image"]).transpose(2, 0, 1).copy()).float()
            feats[n] = model(img[None])["mask_features"][0].reshape(p.model.mask_dim, -1)
    pr = hp.pairs
    cos = np.array([float(torch.nn.functional.cosine_similarity(feats[a][:, pa], feats[b][:, pb], dim=0))
                    for a, pa, b, pb in zip(pr["img_a"], pr["pix_a"], pr["img_b"], pr["pix_b"])])
    pool = np.array(H.POOLS)[pr["pool"]]
    m = np.isin(pool, ["novel_same", "novel_diff"])
    assert out[H.metric_key("feature", "novel")] == pytest.approx(pair_auc(cos[m], pool[m] == "novel_same"), abs=1e-3)


def test_capture_from_the_evaluation_equals_own_forward(tiny):
    from pipeline.engine.evaluate import evaluate_model
    root, p, split, index = tiny
    model, simnet = _model(p, split), _simnet(p, split)
    own = H.HeldoutPairs(root / "dataset", index, split, pairs=3000)
    own.forward(model)
    hp = H.HeldoutPairs(root / "dataset", index, split, pairs=3000)
    with hp.capture(model):
        evaluate_model(model, root / "dataset", index, split, p, torch.device("cpu"), progress=False)
    assert hp._complete()

    def gathered(x):
        order = torch.tensor(np.argsort(x._rows))
        return torch.cat(x._feat)[order], torch.cat(x._score)[order]
    # the same features and novel scores at every pixel (batched vs one image per pass: float noise only)
    for a, b in zip(gathered(own), gathered(hp)):
        assert torch.allclose(a, b, atol=1e-4)
    captured = hp.score(simnet)                     # no model: must use the captured outputs
    # (an untrained student's scores are near ties, so its AUC is left out of the comparison)
    for k in (H.metric_key(s, kind) for s in ("simnet", "feature") for kind in H.KINDS):
        assert captured[k] == pytest.approx(own.score(simnet)[k], abs=1e-3), k


def test_capture_of_other_forward_passes_falls_back_to_its_own(tiny):
    root, p, split, index = tiny
    model = _model(p, split)
    hp = H.HeldoutPairs(root / "dataset", index, split, pairs=1000)
    with torch.no_grad(), hp.capture(model):
        model(torch.zeros(1, 3, 96, 96))              # not a test image
    assert not hp._complete()
    with pytest.raises(ValueError, match="no model outputs"):
        hp.score(None)
    assert set(H.METRIC_KEYS) <= set(hp.score(None, model))


def test_exported_simnet_round_trip(tiny, tmp_path):
    from pipeline.engine.checkpoint import load_checkpoint
    from pipeline.engine.train import export_model
    root, p, split, index = tiny
    model, simnet = _model(p, split), _simnet(p, split).eval()
    export_model(model, p, split, tmp_path / "m.pt", [], simnet)
    loaded = H.load_simnet(load_checkpoint(tmp_path / "m.pt"))
    f = torch.randn(7, p.model.mask_dim)
    assert torch.equal(loaded(f, f.flip(0)), simnet(f, f.flip(0)))
    export_model(model, p, split, tmp_path / "plain.pt", [])
    assert H.load_simnet(load_checkpoint(tmp_path / "plain.pt")) is None


def test_report_keys_match_the_engine():
    from pipeline.report.evidence import HELDOUT_KEYS
    assert set(HELDOUT_KEYS) == set(H.METRIC_KEYS)


# ------------------------------------------------------------------ a grid cell records them
def test_grid_cell_with_the_oracle_teacher_records_heldout_and_the_diagnostic(tiny, tmp_path):
    from pipeline.ablation import cell_params
    from pipeline.config import build_ablation, params_file_text
    from pipeline.data.splits import write_split
    from pipeline.grid import CellJob, run_cell
    root, _, split, index = tiny
    raw = file_params(TINY)
    grid = build_ablation(raw["ablation"])
    p = cell_params(raw, grid, "full_oracle_teacher", 3)
    write_split(tmp_path / "split", split, index)
    job = CellJob("full_oracle_teacher", 3, p, params_file_text(p, "test"), False, root / "dataset",
                  tmp_path / "split", None, tmp_path / "main.pt", tmp_path / "ck" / "cell.pt",
                  tmp_path / "out" / "full_oracle_teacher-3", threads=1, mlflow=False)
    result = run_cell(job)
    cell = json.loads((job.out / "cell.json").read_text())
    assert cell["diagnostic"] == "uses novel masks (oracle teacher)"
    assert set(H.METRIC_KEYS) <= set(cell["heldout"])
    assert result["heldout"][H.metric_key("student", "novel")] == cell["heldout"][H.metric_key("student", "novel")]
    assert math.isfinite(cell["heldout"][H.metric_key("simnet", "base")])   # its SimNet trained (SimLoss on)
    from pipeline.engine.checkpoint import load_checkpoint
    assert H.load_simnet(load_checkpoint(job.out / "model.pt")) is not None
