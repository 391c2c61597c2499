"""The weak-shot initialisation (pretrain stage) and the frozen-encoder recipe."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import build_params
from pipeline.engine.pretrain import initial_state, pretrain, weak_shot_pretrain_losses
from pipeline.engine.train import FastPath, build_training, train
from pipeline.model import build_model
from tests.helpers import run_stage, small_params, write_params


def test_pretrain_losses_never_see_a_novel_mask():
    """Changing the logits at novel and unlabelled pixels leaves the pixel loss unchanged; the
    image loss targets are the classes present (novel included)."""
    torch.manual_seed(0)
    sem = torch.tensor([[[0, 1], [2, 255]]])            # base 0, 1; novel 2; unlabelled 255
    logits = torch.randn(1, 3, 2, 2)
    image_logits = torch.zeros(1, 3)
    base = torch.tensor([0, 1])
    a = weak_shot_pretrain_losses(logits, image_logits, sem, base, 3)
    changed = logits.clone()
    changed[0, :, 1, :] = torch.tensor([[9.0, -9.0], [-9.0, 9.0], [5.0, 5.0]])  # the novel and 255 pixels
    b = weak_shot_pretrain_losses(changed, image_logits, sem, base, 3)
    assert a["pixel"].item() == pytest.approx(b["pixel"].item())
    expected = torch.nn.functional.cross_entropy(logits[0, :, 0, :].t(), torch.tensor([0, 1]))
    assert a["pixel"].item() == pytest.approx(expected.item(), rel=1e-5)
    # all three classes are present: BCE of logit 0 against 1 for each = log 2
    assert a["image"].item() == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-6)


def test_pretrain_writes_torchvision_names_that_a_maskformer_loads(tiny_data):
    p = build_params(small_params())
    split = json.loads((tiny_data / "split" / "split.json").read_text())
    index = json.loads((tiny_data / "split" / "index.json").read_text())
    net, curve = pretrain(tiny_data / "dataset", index, split, arch="resnet18", conv_dim=p.model.conv_dim,
                          mask_dim=p.model.mask_dim, gn_groups=p.model.gn_groups, crop_size=32, scale=(1.0, 1.0),
                          iterations=3, batch_size=2, lr=1e-3, weight_decay=0.0, seed=1, log_interval=2,
                          progress=False)
    assert [c["step"] for c in curve] == [2, 3]
    assert {"pixel", "image", "loss", "lr", "seconds"} <= set(curve[0])
    state = initial_state(net)
    assert "conv1.weight" in state["backbone"] and "layer4.1.bn2.running_var" in state["backbone"]
    model = build_model(p.model, split["num_classes"], state["backbone"], state["pixel_decoder"])
    assert torch.equal(model.backbone.stem[0].weight, net.backbone.stem[0].weight)
    assert torch.equal(model.pixel_decoder.mask_features.weight, net.pixel_decoder.mask_features.weight)


def test_weak_shot_without_its_initialisation_is_refused(tiny_data, tmp_path):
    p = build_params(small_params(model={"pretrained": "weak_shot"}))
    split = json.loads((tiny_data / "split" / "split.json").read_text())
    index = json.loads((tiny_data / "split" / "index.json").read_text())
    with pytest.raises(ValueError, match="model.pretrained is 'weak_shot' but no weak-shot initialisation"):
        train(p, tiny_data / "dataset", split, index, tmp_path / "ck.pt", progress=False)


def test_frozen_encoder_gets_no_gradient_and_does_not_move(tiny_data):
    from pipeline.engine.train import build_train_loader, train_step
    p = build_params(small_params(train={"freeze": "encoder"}))
    split = json.loads((tiny_data / "split" / "split.json").read_text())
    index = json.loads((tiny_data / "split" / "index.json").read_text())
    tr = build_training(p, split, torch.device("cpu"), FastPath())
    model = tr.state.model
    assert not any(q.requires_grad for q in model.backbone.parameters())
    assert not any(q.requires_grad for q in model.pixel_decoder.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = next(iter(build_train_loader(p, tiny_data / "dataset", index, 0, 1, torch.device("cpu"))))
    train_step(tr, batch)
    after = model.state_dict()
    assert torch.equal(before["pixel_decoder.mask_features.weight"], after["pixel_decoder.mask_features.weight"])
    assert torch.equal(before["backbone.res5.1.conv2.weight"], after["backbone.res5.1.conv2.weight"])
    assert not torch.equal(before["class_embed.weight"], after["class_embed.weight"])


def test_pretrain_stage_placeholder_when_not_used(tiny_data, tmp_path):
    params = write_params(tmp_path / "params.yaml", small_params())        # model.pretrained: none
    out = tmp_path / "init.pt"
    assert run_stage("pretrain", "--params", str(params), "--dataset-dir", str(tiny_data / "dataset"),
                     "--split-dir", str(tiny_data / "split"), "--out", str(out), "--curve",
                     str(tmp_path / "c.csv"), "--no-progress") == 0
    assert torch.load(out, weights_only=True) == {"used": False, "reason": "model.pretrained is 'none'"}
