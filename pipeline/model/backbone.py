"""ResNet backbone (torchvision) returning res2..res5, with optional frozen BatchNorm."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.ops.misc import FrozenBatchNorm2d

CHANNELS = {"resnet18": (64, 128, 256, 512), "resnet34": (64, 128, 256, 512),
            "resnet50": (256, 512, 1024, 2048), "resnet101": (256, 512, 1024, 2048)}
# RGB mean / std in 0..255 units (torchvision / detectron2 ImageNet statistics).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class ResNetBackbone(nn.Module):
    """torchvision ResNet without its classifier; ``forward`` gives strides 4, 8, 16, 32."""

    def __init__(self, arch: str = "resnet50", freeze_bn: bool = True, state_dict: dict | None = None):
        super().__init__()
        if arch not in CHANNELS:
            raise ValueError(f"model.backbone: unknown '{arch}'; allowed: {', '.join(CHANNELS)}")
        norm = FrozenBatchNorm2d if freeze_bn else nn.BatchNorm2d
        net = getattr(resnet, arch)(weights=None, norm_layer=norm)
        if state_dict is not None:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(state_dict, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(f"backbone weights do not fit {arch}: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.res2, self.res3, self.res4, self.res5 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = CHANNELS[arch]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        r2 = self.res2(x)
        r3 = self.res3(r2)
        r4 = self.res4(r3)
        r5 = self.res5(r4)
        return {"res2": r2, "res3": r3, "res4": r4, "res5": r5}
