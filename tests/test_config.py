"""params.yaml and pipeline.config: the file holds every value, defaults and help, hashing, and
validation (wrong type, out of range, unknown key, non-finite) naming the key."""
import dataclasses
import json
import re
import typing

import pytest
import yaml

from pipeline.config import ConfigError, Params, build_params, describe, flatten, params_hash, to_dict
from tests.helpers import ROOT, file_params, merge, small_params


def test_params_yaml_is_valid_and_defaults_match():
    p = build_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert p.data.dataset == "synthetic" and p.loss.comp_weight == 0.15 and p.loss.sim_weight == 1.0
    assert p.loss.comp_bg_logit == pytest.approx(-2.9444)


def _typed_keys(tp=Params, prefix="") -> list[str]:
    hints, out = typing.get_type_hints(tp), []
    for f in dataclasses.fields(tp):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _typed_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def test_values_live_only_in_params_yaml():
    """No dataclass field has a default: every value comes from the params file, which sets every key."""
    def fields(tp):
        hints = typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            yield f, dataclasses.is_dataclass(hints[f.name])
            if dataclasses.is_dataclass(hints[f.name]):
                yield from fields(hints[f.name])
    with_default = [f.name for f, _ in fields(Params)
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert with_default == []
    assert [f.name for f, group in fields(Params) if not group and not f.metadata.get("help")] == []
    flat = flatten(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert sorted(k for k in flat if not k.startswith("ablation.")) == sorted(_typed_keys())
    assert {"ablation.seeds", "ablation.iterations"} <= set(flat)


@pytest.mark.parametrize("drop, message", [
    (("train", "lr"), "params key 'train.lr' is missing"),
    (("data", "synthetic"), "params key 'data.synthetic' is missing"),
    (("eval", None), "params group 'eval' is missing"),
])
def test_a_missing_key_is_an_error(drop, message):
    raw = file_params()
    group, key = drop
    if key is None:
        del raw[group]
    else:
        del raw[group][key]
    with pytest.raises(ConfigError, match=message):
        build_params(raw)


def test_describe_lists_every_key_with_the_value_in_force():
    raw = file_params({"train": {"lr": 0.00123}, "data": {"synthetic": {"num_train": 77}}})
    text = describe(raw)
    for key in _typed_keys():
        *groups, name = key.split(".")
        assert f"{'  ' * len(groups)}{name}: " in text, key
    assert "  lr: 0.00123  [number > 0.0] AdamW learning rate" in text
    assert "    num_train: 77  [integer >= 4] training images generated" in text
    assert "ablation:\n" in text and f"  seeds: {json.dumps(raw['ablation']['seeds'])}  " in text
    for variant in raw["ablation"]["variants"]:
        assert f"    {variant}: " in text
    assert "  backbone: \"resnet18\"  [resnet18 | resnet34 | resnet50 | resnet101]" in describe(
        file_params({"model": {"backbone": "resnet18"}}))


def test_train_help_prints_the_params_file_values(tmp_path):
    """`python -m stages.train --help` lists every key with the value of the --params file."""
    import subprocess
    import sys
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(file_params({"train": {"iterations": 4321}, "ablation": {"iterations": 17}})))
    r = subprocess.run([sys.executable, "-m", "stages.train", "--help", "--params", str(params)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"values in force in '{params}'" in r.stdout
    assert "  iterations: 4321  [integer >= 1] training steps" in r.stdout
    assert "  iterations: 17  training iterations of a grid cell" in r.stdout
    assert "    image_size: " in r.stdout and "  variants:  " in r.stdout


@pytest.mark.parametrize("raw, message", [
    ({"loss": {"pp_wieght": 0.5}}, "unknown params key 'loss.pp_wieght'. Did you mean 'loss.pp_weight'?"),
    ({"data": {"dataset": "cityscapes"}}, "params key 'data.dataset': 'cityscapes' is not allowed; allowed values: "
                                          "synthetic, ade20k, coco_stuff_10k"),
    ({"data": {"dataset": "ade20k", "split": 5}}, "params key 'data.split': 5 is out of range for dataset 'ade20k'; "
                                                  "allowed values: 1, 2, 3, 4"),
    ({"train": {"iterations": "many"}}, "params key 'train.iterations': expected an integer, got 'many' (str)"),
    ({"train": {"lr": -1.0}}, "params key 'train.lr': -1.0 is out of range; expected a value > 0.0"),
    ({"train": {"device": "tpu"}}, "allowed values: auto, cpu, cuda"),
    ({"model": {"freeze_bn": "yes"}}, "params key 'model.freeze_bn': expected true or false"),
    ({"modle": {}}, "unknown params group 'modle'. Did you mean 'model'?"),
])
def test_bad_params_name_key_and_allowed_values(raw, message):
    with pytest.raises(ConfigError) as e:
        build_params(file_params(raw))
    assert message in str(e.value)


def test_flatten_and_hash():
    p = build_params(file_params({"loss": {"pp_weight": 0.25}, "data": {"synthetic": {"num_train": 40}}}))
    flat = flatten(to_dict(p))
    assert flat["loss.pp_weight"] == 0.25 and flat["data.synthetic.num_train"] == 40
    assert params_hash(p) == params_hash(build_params(file_params({"loss": {"pp_weight": 0.25},
                                                                   "data": {"synthetic": {"num_train": 40}}})))
    assert params_hash(p) != params_hash(build_params(file_params({"loss": {"pp_weight": 0.5},
                                                                   "data": {"synthetic": {"num_train": 40}}})))
    q = build_params(file_params({"loss": {"pp_weight": 0.25}, "data": {"synthetic": {"num_train": 40}},
                                  "eval": {"max_images": 3}}))
    assert params_hash(p) == params_hash(q)                               # eval does not train


def test_yaml_exponent_strings_are_numbers_for_float_keys():
    # PyYAML (YAML 1.1) loads `lr: 1e-4` as the string '1e-4'
    raw = yaml.safe_load("train:\n  lr: 1e-4\n")
    assert raw["train"]["lr"] == "1e-4"
    assert build_params(file_params(raw)).train.lr == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match=r"params key 'train.iterations': expected an integer, got '1e3'"):
        build_params(file_params({"train": {"iterations": "1e3"}}))


# ============================================================================ validation of every group

# group -> [(bad value, message fragments)]: wrong type, out of range, unknown key (+ a choice)
BAD_PARAMS = [
    ({"base": {"seed": "six"}}, ["'base.seed'", "expected an integer", "'six'"]),
    ({"base": {"seed": -1}}, ["'base.seed'", "-1 is out of range", ">= 0"]),
    ({"base": {"sed": 1}}, ["unknown params key 'base.sed'", "Did you mean 'base.seed'?", "Allowed keys in 'base': seed"]),
    ({"data": {"crop_size": 64.5}}, ["'data.crop_size'", "expected an integer", "64.5 (float)"]),
    ({"data": {"prepare_workers": 0}}, ["'data.prepare_workers'", "out of range", ">= 1"]),
    ({"data": {"scale_min": 0.0}}, ["'data.scale_min'", "out of range", "> 0.0"]),
    ({"data": {"crop_sise": 64}}, ["unknown params key 'data.crop_sise'", "Did you mean 'data.crop_size'?",
                                   "Allowed keys in 'data':", "crop_size"]),
    ({"data": {"synthetic": {"image_size": "big"}}}, ["'data.synthetic.image_size'", "expected an integer"]),
    ({"data": {"synthetic": {"image_size": 2048}}}, ["'data.synthetic.image_size'", "out of range", "<= 1024"]),
    ({"data": {"synthetic": {"num_trian": 8}}}, ["unknown params key 'data.synthetic.num_trian'",
                                                 "Did you mean 'data.synthetic.num_train'?"]),
    ({"data": {"synthetic": 5}}, ["'data.synthetic'", "expected a mapping"]),
    ({"model": {"hidden_dim": "128"}}, ["'model.hidden_dim'", "expected an integer", "'128' (str)"]),
    ({"model": {"dropout": 1.5}}, ["'model.dropout'", "out of range", "<= 1.0"]),
    ({"model": {"backbone": "vit_b"}}, ["'model.backbone'", "allowed values: resnet18, resnet34, resnet50, resnet101"]),
    ({"model": {"backbon": "resnet18"}}, ["unknown params key 'model.backbon'", "Did you mean 'model.backbone'?"]),
    ({"loss": {"deep_supervision": "yes please"}}, ["'loss.deep_supervision'", "expected true or false"]),
    ({"loss": {"focal_alpha": 2.0}}, ["'loss.focal_alpha'", "out of range", "<= 1.0"]),
    ({"loss": {"pp_form": "kl"}}, ["'loss.pp_form'", "allowed values: cce, ce"]),
    ({"loss": {"pp_pairing": "both"}}, ["'loss.pp_pairing'", "allowed values: cross_image, within_image"]),
    ({"loss": {"simnet_block_convs": 3}}, ["'loss.simnet_block_convs'", "out of range", "<= 2"]),
    ({"loss": {"pp_start": -1}}, ["'loss.pp_start'", "out of range", ">= 0"]),
    ({"loss": {"sim_wieght": 1.0}}, ["unknown params key 'loss.sim_wieght'", "Did you mean 'loss.sim_weight'?"]),
    ({"train": {"batch_size": 8.0}}, ["'train.batch_size'", "expected an integer", "8.0 (float)"]),
    ({"train": {"checkpoint_interval": 0}}, ["'train.checkpoint_interval'", "out of range", ">= 1"]),
    ({"train": {"batch_size": 5}}, ["'train.batch_size'", "must be even"]),
    ({"train": {"iteration": 10}}, ["unknown params key 'train.iteration'", "Did you mean 'train.iterations'?"]),
    ({"eval": {"max_images": "all"}}, ["'eval.max_images'", "expected an integer"]),
    ({"eval": {"max_images": -1}}, ["'eval.max_images'", "out of range", ">= 0"]),
    ({"eval": {"device": "gpu"}}, ["'eval.device'", "allowed values: auto, cpu, cuda"]),
    ({"eval": {"devcie": "cpu"}}, ["unknown params key 'eval.devcie'", "Did you mean 'eval.device'?"]),
    ({"pseudo": {"enabled": "maybe"}}, ["'pseudo.enabled'", "expected true or false"]),
    ({"pseudo": {"iterations": -5}}, ["'pseudo.iterations'", "out of range", ">= 0"]),
    ({"pseudo": {"iters": 5}}, ["unknown params key 'pseudo.iters'", "Allowed keys in 'pseudo': enabled, iterations"]),
    ({"pretrain": {"lr": "fast"}}, ["'pretrain.lr'", "expected a number"]),
    ({"pretrain": {"iterations": 0}}, ["'pretrain.iterations'", "out of range", ">= 1"]),
    ({"pretrain": {"iters": 5}}, ["unknown params key 'pretrain.iters'", "Did you mean 'pretrain.iterations'?"]),
    ({"report": {"title": 5}}, ["'report.title'", "expected a string", "5 (int)"]),
    ({"report": {"smoothing": 0}}, ["'report.smoothing'", "out of range", ">= 1"]),
    ({"report": {"smooth": 3}}, ["unknown params key 'report.smooth'", "Did you mean 'report.smoothing'?"]),
]


@pytest.mark.parametrize("bad, fragments", BAD_PARAMS, ids=lambda x: json.dumps(x) if isinstance(x, dict) else "")
def test_every_group_rejects_wrong_type_range_and_typo(bad, fragments):
    from pipeline.config import ConfigError, build_params
    with pytest.raises(ConfigError) as ei:
        build_params(merge(small_params(), bad))
    for frag in fragments:
        assert frag in str(ei.value), str(ei.value)


def test_bad_params_cover_every_group_three_ways():
    from pipeline.config import GROUPS
    kinds: dict[str, set] = {g: set() for g in GROUPS}
    for bad, frags in BAD_PARAMS:
        (group,) = bad
        text = " ".join(frags)
        kinds[group] |= {"typo" if "unknown params key" in text else "range" if "out of range" in text
                         else "type" if "expected" in text else "other"}
    assert all({"typo", "range", "type"} <= k for k in kinds.values()), kinds


@pytest.mark.parametrize("bad", [{"train": {"lr": float("nan")}}, {"loss": {"pp_weight": float("inf")}},
                                 {"model": {"dropout": float("nan")}}])
def test_non_finite_float_params_rejected(bad):
    from pipeline.config import ConfigError, build_params
    key = next(f"{g}.{k}" for g, v in bad.items() for k in v)
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'") + ".*finite"):
        build_params(merge(small_params(), bad))
