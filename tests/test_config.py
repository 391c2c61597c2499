import pytest
import yaml

from pipeline.config import ConfigError, build_params, flatten, params_hash, to_dict
from tests.conftest import ROOT


def test_params_yaml_is_valid_and_defaults_match():
    p = build_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert p.data.dataset == "synthetic" and p.loss.comp_weight == 0.15 and p.loss.sim_weight == 1.0
    assert p.loss.comp_bg_logit == pytest.approx(-2.9444)


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
        build_params(raw)
    assert message in str(e.value)


def test_flatten_and_hash():
    p = build_params({})
    flat = flatten(to_dict(p))
    assert flat["loss.pp_weight"] == p.loss.pp_weight and flat["data.synthetic.num_train"] == 320
    assert params_hash(p) == params_hash(build_params({}))
    assert params_hash(p) != params_hash(build_params({"loss": {"pp_weight": 0.5}}))
    assert params_hash(p) == params_hash(build_params({"eval": {"max_images": 3}}))   # eval does not train


def test_yaml_exponent_strings_are_numbers_for_float_keys():
    # PyYAML (YAML 1.1) loads `lr: 1e-4` as the string '1e-4'
    raw = yaml.safe_load("train:\n  lr: 1e-4\n")
    assert raw["train"]["lr"] == "1e-4"
    assert build_params(raw).train.lr == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match=r"params key 'train.iterations': expected an integer, got '1e3'"):
        build_params({"train": {"iterations": "1e3"}})
