"""FPN pixel decoder with GroupNorm (MaskFormer's per-pixel embedding module)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_gn(cin: int, cout: int, k: int, groups: int, relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(groups, cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class FPNPixelDecoder(nn.Module):
    """Top-down FPN over res5..res2; ``mask_features`` is a 3x3 conv on the stride-4 output."""

    def __init__(self, in_channels: tuple[int, int, int, int], conv_dim: int = 256, mask_dim: int = 256,
                 gn_groups: int = 32):
        super().__init__()
        c2, c3, c4, c5 = in_channels
        self.top = _conv_gn(c5, conv_dim, 3, gn_groups, relu=True)
        self.lateral = nn.ModuleList([_conv_gn(c, conv_dim, 1, gn_groups, relu=False) for c in (c4, c3, c2)])
        self.output = nn.ModuleList([_conv_gn(conv_dim, conv_dim, 3, gn_groups, relu=True) for _ in range(3)])
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        y = self.top(feats["res5"])
        for lateral, output, name in zip(self.lateral, self.output, ("res4", "res3", "res2")):
            x = lateral(feats[name])
            y = output(x + F.interpolate(y, size=x.shape[-2:], mode="nearest"))
        return self.mask_features(y)
