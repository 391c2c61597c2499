"""Backbone weights: none / local file / imagenet (offline simulated, never the internet)."""
from __future__ import annotations

import os
import socket
import urllib.error

import pytest
import torch
import torch.hub
import torchvision

from pipeline.model.weights import WeightsError, imagenet_weights_info, load_backbone_state_dict


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No network and an empty torch hub cache in tmp_path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_urlopen(*a, **k):
        raise urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known (test)"))

    monkeypatch.setattr(torch.hub, "urlopen", no_urlopen)

    def no_connect(self, addr):
        raise AssertionError(f"test tried to connect to {addr}")

    monkeypatch.setattr(socket.socket, "connect", no_connect)


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


def test_none():
    assert load_backbone_state_dict("none", "resnet18") is None
    assert load_backbone_state_dict("", "resnet50") is None


def test_local_file_loads(tmp_path, resnet18_state):
    path = tmp_path / "r18.pth"
    torch.save(resnet18_state, path)
    sd = load_backbone_state_dict(str(path), "resnet18")
    assert set(sd) == set(resnet18_state)
    assert torch.equal(sd["conv1.weight"], resnet18_state["conv1.weight"])
    # a wrapped checkpoint without the classifier also works
    wrapped = {"state_dict": {f"module.{k}": v for k, v in resnet18_state.items() if not k.startswith("fc.")}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    sd2 = load_backbone_state_dict(str(tmp_path / "wrapped.pth"), "resnet18")
    assert "layer4.1.bn2.running_var" in sd2 and "fc.weight" not in sd2
    net = torchvision.models.resnet18(weights=None)
    net.load_state_dict(sd2, strict=False)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError) as ei:
        load_backbone_state_dict(str(missing), "resnet18")
    assert str(missing) in str(ei.value) and "not found" in str(ei.value)


def test_not_a_resnet_state_dict(tmp_path):
    path = tmp_path / "mlp.pth"
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU()).state_dict(), path)
    with pytest.raises(WeightsError) as ei:
        load_backbone_state_dict(str(path), "resnet18")
    msg = str(ei.value)
    assert str(path) in msg and "missing keys" in msg and "conv1.weight" in msg


def test_wrong_depth_and_garbage(tmp_path, resnet18_state):
    path = tmp_path / "r18.pth"
    torch.save(resnet18_state, path)
    with pytest.raises(WeightsError, match="r18.pth"):
        load_backbone_state_dict(str(path), "resnet50")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="junk.pth"):
        load_backbone_state_dict(str(junk), "resnet18")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="list.pth.*not a state dict"):
        load_backbone_state_dict(str(tmp_path / "list.pth"), "resnet18")


def test_imagenet_offline_clear_message():
    info = imagenet_weights_info("resnet50")
    with pytest.raises(WeightsError) as ei:
        load_backbone_state_dict("imagenet", "resnet50", progress=False)
    msg = str(ei.value)
    assert info["url"] in msg and "model.pretrained: /path/to/" in msg and info["file"] in msg
    assert info["url"].startswith("https://download.pytorch.org/")


def test_imagenet_from_cache_offline(resnet18_state):
    info = imagenet_weights_info("resnet18")
    cache = torch.hub.get_dir()
    assert info["cache"].startswith(cache)  # TORCH_HOME points into tmp_path
    os.makedirs(os.path.dirname(info["cache"]), exist_ok=True)
    torch.save(resnet18_state, info["cache"])
    sd = load_backbone_state_dict("imagenet", "resnet18", progress=False)
    assert torch.equal(sd["fc.weight"], resnet18_state["fc.weight"])


def test_unknown_arch():
    with pytest.raises(WeightsError, match="vgg16"):
        load_backbone_state_dict("imagenet", "vgg16")
