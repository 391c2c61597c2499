"""MaskFormer: per-pixel embeddings + mask classification with learned queries."""
from __future__ import annotations

import torch
from torch import nn

from .backbone import PIXEL_MEAN, PIXEL_STD, ResNetBackbone
from .pixel_decoder import FPNPixelDecoder
from .transformer_decoder import TransformerDecoder


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class MaskFormer(nn.Module):
    """``forward(images)`` takes RGB in 0..255 (B x 3 x H x W) and returns the outputs dict.

    ``pred_logits``: B x Q x (K+1) (last = no-object); ``pred_masks``: B x Q x H/4 x W/4 mask
    logits; ``mask_features``: B x C x H/4 x W/4; ``aux_outputs``: the same two keys for every
    earlier decoder layer (deep supervision).

    ``transformer_in``: the map the queries attend to, MaskFormer's TRANSFORMER_IN_FEATURE:
    ``res5`` (the paper) or ``pixel_embedding`` (the stride-4 mask features).
    """

    def __init__(self, num_classes: int, backbone: ResNetBackbone, pixel_decoder: FPNPixelDecoder,
                 decoder: TransformerDecoder, mask_dim: int, transformer_in: str = "res5"):
        super().__init__()
        self.transformer_in = transformer_in
        self.num_classes = num_classes
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.decoder = decoder
        d = decoder.d_model
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.mask_embed = MLP(d, d, mask_dim, 3)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> dict:
        x = (images - self.pixel_mean) / self.pixel_std
        feats = self.backbone(x)
        mask_features = self.pixel_decoder(feats)
        memory = feats["res5"] if self.transformer_in == "res5" else mask_features
        hs = self.decoder(memory)                              # L x B x Q x d
        logits = self.class_embed(hs)                          # L x B x Q x K+1
        masks = torch.einsum("lbqc,bchw->lbqhw", self.mask_embed(hs), mask_features)
        out = {"pred_logits": logits[-1], "pred_masks": masks[-1], "mask_features": mask_features,
               "aux_outputs": [{"pred_logits": a, "pred_masks": b} for a, b in zip(logits[:-1], masks[:-1])]}
        return out


def semantic_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """Score map S[c](x) = sum_q softmax(cls_q)[c] * sigmoid(mask_q(x)), no-object dropped.

    pred_logits B x Q x (K+1), pred_masks B x Q x H x W -> B x K x H x W.
    """
    cls = pred_logits.float().softmax(-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", cls, pred_masks.float().sigmoid())
