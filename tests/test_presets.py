import subprocess
import sys

import pytest
import yaml

from pipeline.ablation import _merge
from pipeline.config import build_params
from tools.preset import flags
from tests.helpers import ROOT


@pytest.mark.parametrize("name, dataset, crop, iters, comp, pp", [
    ("paper-ade20k", "ade20k", 512, 160000, 0.2, 0.5),
    ("paper-coco_stuff_10k", "coco_stuff_10k", 640, 60000, 0.15, 0.1),
])
def test_paper_presets_are_valid_and_match_the_reference(name, dataset, crop, iters, comp, pp):
    preset = yaml.safe_load((ROOT / "presets" / f"{name}.yaml").read_text())
    p = build_params({k: v for k, v in _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), preset, "").items()
                      if k != "ablation"})
    assert (p.data.dataset, p.data.crop_size, p.train.iterations) == (dataset, crop, iters)
    assert (p.loss.comp_weight, p.loss.pp_weight) == (comp, pp)
    assert (p.model.backbone, p.model.num_queries, p.model.dec_layers, p.model.hidden_dim) == ("resnet50", 100, 6, 256)
    assert (p.train.lr, p.train.backbone_lr_mult, p.train.batch_size) == (1e-4, 0.1, 8)
    assert (p.loss.sim_points, p.loss.sim_base_points, p.loss.pp_points) == (100, 80, 100)
    # the synthetic recipe's deviations do not leak into the paper's
    assert (p.model.pretrained, p.train.freeze, p.data.photometric, p.model.dropout) == ("imagenet", "none", True, 0.1)
    assert (p.model.transformer_in, p.train.warmup, p.loss.match_class_cost) == ("res5", 0, 1.0)


def test_preset_prints_dvc_set_param_flags():
    out = subprocess.run([sys.executable, "-m", "tools.preset", "presets/paper-ade20k.yaml"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    pairs = dict(zip(out[1::2], out[::2]))
    assert set(out[::2]) == {"-S"}
    assert "model.freeze_bn=true" in pairs and "ablation.seeds=[6]" in pairs and "data.dataset=ade20k" in pairs
    assert flags({"a": {"b": 1, "c": [1, 2]}}) == ["-S", "a.b=1", "-S", "a.c=[1,2]"]


def test_preset_with_a_typo_fails_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  iteratons: 5\n")
    r = subprocess.run([sys.executable, "-m", "tools.preset", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown params key 'train.iteratons'. Did you mean 'train.iterations'?" in r.stderr


def test_the_verdict_presets_are_valid_and_never_reuse_a_seed():
    """The pilot and the two evidence runs of docs/EVIDENCE.md: valid params, the setting with headroom,
    and seeds that no earlier run of the verdict used (a later run is analysed on its own)."""
    from pipeline.config import build_ablation
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    seen: set[int] = set()
    for name, variants, splits, n_pairs in (("verdict-pilot", ["pp0", "full", "full_oracle_teacher"], [], 3),
                                            ("verdict", ["pp0", "full", "full_oracle_teacher", "+complementary"],
                                             [1, 2, 3, 4], 12),
                                            ("verdict-2", ["pp0", "full", "full_oracle_teacher"], [1, 2, 3, 4], 24)):
        raw = _merge(base, yaml.safe_load((ROOT / "presets" / f"{name}.yaml").read_text()), "")
        p = build_params({k: v for k, v in raw.items() if k != "ablation"})
        grid = build_ablation(raw["ablation"])
        assert (p.data.synthetic.cooccur, p.data.synthetic.num_test, p.train.iterations, p.train.threads) == \
            (1.0, 400, 800, 1), name
        assert list(grid.run) == variants and list(grid.splits) == splits, name
        assert len(grid.seeds) * max(1, len(grid.splits)) == n_pairs, name
        assert not seen & set(grid.seeds), f"{name} reuses seeds {sorted(seen & set(grid.seeds))}"
        seen |= set(grid.seeds)
