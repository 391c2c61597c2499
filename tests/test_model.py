import math

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.model import build_model, semantic_inference
from pipeline.model.transformer_decoder import sine_position_encoding

TINY = ModelConfig(backbone="resnet18", pretrained="none", freeze_bn=False, hidden_dim=32, num_queries=5, nheads=2,
                   dec_layers=2, transformer_in="res5", dim_feedforward=64, dropout=0.1, conv_dim=32, mask_dim=16, gn_groups=8)


def test_output_shapes_and_deep_supervision():
    torch.manual_seed(0)
    m = build_model(TINY, num_classes=7).eval()
    out = m(torch.rand(2, 3, 64, 96) * 255)
    assert out["pred_logits"].shape == (2, 5, 8)
    assert out["pred_masks"].shape == (2, 5, 16, 24)
    assert out["mask_features"].shape == (2, 16, 16, 24)
    assert len(out["aux_outputs"]) == 1
    assert out["aux_outputs"][0]["pred_masks"].shape == (2, 5, 16, 24)


def test_frozen_bn_has_no_trainable_norm():
    m = build_model(ModelConfig(**{**TINY.__dict__, "freeze_bn": True}), 3)
    bn = [n for n, _ in m.backbone.named_parameters() if "bn" in n]
    assert bn == []          # FrozenBatchNorm2d keeps weights as buffers
    m2 = build_model(TINY, 3)
    assert any("bn" in n for n, _ in m2.backbone.named_parameters())


def test_paper_r50_config_builds():
    m = build_model(ModelConfig(backbone="resnet50", pretrained="none", hidden_dim=256, num_queries=100, nheads=8,
                                dec_layers=6, transformer_in="res5", dim_feedforward=2048, dropout=0.1, conv_dim=256,
                                mask_dim=256,
                                gn_groups=32, freeze_bn=True), 171)
    assert m.decoder.input_proj.in_channels == 2048
    assert m.class_embed.out_features == 172
    assert len(m.decoder.layers) == 6


def test_pixel_embedding_memory_attends_to_the_mask_features():
    """transformer_in: pixel_embedding: the queries' memory is the stride-4 mask features
    (mask_dim channels, H/4 x W/4 tokens), not res5 (512 channels, H/32 x W/32)."""
    m = build_model(ModelConfig(**{**TINY.__dict__, "transformer_in": "pixel_embedding"}), 3).eval()
    assert m.decoder.input_proj.in_channels == TINY.mask_dim
    seen = []
    m.decoder.input_proj.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    out = m(torch.rand(2, 3, 64, 64) * 255)
    assert seen == [(2, TINY.mask_dim, 16, 16)]
    assert out["pred_masks"].shape == (2, TINY.num_queries, 16, 16)
    assert build_model(TINY, 3).decoder.input_proj.in_channels == 512     # res5 of a ResNet-18


def test_semantic_inference_by_hand():
    # One query, K=2: softmax([ln3, 0, 0]) = [0.6, 0.2, 0.2]; mask sigmoid(0) = 0.5
    logits = torch.tensor([[[math.log(3.0), 0.0, 0.0]]])
    masks = torch.zeros(1, 1, 1, 1)
    s = semantic_inference(logits, masks)
    assert s.shape == (1, 2, 1, 1)
    assert s.flatten().tolist() == pytest.approx([0.3, 0.1])


def test_position_encoding_shape_and_range():
    pe = sine_position_encoding(torch.zeros(1, 8, 3, 4), num_feats=4)
    assert pe.shape == (1, 8, 3, 4)
    assert pe.abs().max() <= 1.0
