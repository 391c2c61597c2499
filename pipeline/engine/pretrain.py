"""Weak-shot initialisation: the part ImageNet plays in the paper, for data with no ImageNet.

The paper starts from an ImageNet ResNet; the embedded synthetic dataset has no such
network, and training MaskFormer from scratch on 2 CPU cores does not converge in minutes.
This stage trains the backbone and the FPN pixel decoder **once**, with only the weak-shot
supervision every variant is allowed (never a novel mask):

* per-pixel cross-entropy over the classes on **base** pixels (novel and unlabelled pixels
  are ignored), from a 1x1 head on ``mask_features``;
* multi-label binary cross-entropy on **image-level labels** of all classes (base and
  novel), from a linear head on the globally pooled res5 features.

The heads are thrown away; the backbone and pixel decoder weights initialise every training
run (main model, every ablation cell, the oracle included), so variants differ only in what
the paper varies. The stage is cached by DVC and shared: a loss change never re-runs it.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.dataset import IGNORE, TrainCrops, collate_train
from ..data.sampler import RandomBatchSampler
from ..model.backbone import PIXEL_MEAN, PIXEL_STD, ResNetBackbone
from ..model.pixel_decoder import FPNPixelDecoder


class PretrainNet(nn.Module):
    """Backbone + pixel decoder (as in MaskFormer) with a per-pixel head and an image-label head."""

    def __init__(self, arch: str, num_classes: int, conv_dim: int, mask_dim: int, gn_groups: int,
                 freeze_bn: bool = False):
        super().__init__()
        self.backbone = ResNetBackbone(arch, freeze_bn=freeze_bn)
        self.pixel_decoder = FPNPixelDecoder(self.backbone.channels, conv_dim, mask_dim, gn_groups)
        self.pixel_head = nn.Conv2d(mask_dim, num_classes, 1)
        self.image_head = nn.Linear(self.backbone.channels[-1], num_classes)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone((images - self.pixel_mean) / self.pixel_std)
        pixel_logits = self.pixel_head(self.pixel_decoder(feats))          # B x K x H/4 x W/4
        image_logits = self.image_head(feats["res5"].mean(dim=(2, 3)))     # B x K
        return pixel_logits, image_logits


def weak_shot_pretrain_losses(pixel_logits: torch.Tensor, image_logits: torch.Tensor, sem_seg: torch.Tensor,
                              base_ids: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """``pixel``: CE on base pixels only; ``image``: multi-label BCE on the classes present.

    ``sem_seg``: B x H x W labels (255 = unlabelled or padding). Novel pixels are turned into
    ignore before the pixel loss, so no novel mask is ever used.
    """
    is_base = torch.zeros(256, dtype=torch.bool, device=sem_seg.device)
    is_base[base_ids] = True
    target = torch.where(is_base[sem_seg], sem_seg, torch.full_like(sem_seg, IGNORE))
    logits = F.interpolate(pixel_logits, size=sem_seg.shape[-2:], mode="bilinear", align_corners=False)
    if bool((target != IGNORE).any()):
        pixel = F.cross_entropy(logits, target, ignore_index=IGNORE)
    else:
        pixel = logits.sum() * 0.0
    present = torch.zeros(sem_seg.shape[0], 257, device=sem_seg.device)
    present.scatter_(1, sem_seg.flatten(1), 1.0)          # image-level labels of every class
    image = F.binary_cross_entropy_with_logits(image_logits, present[:, :num_classes])
    return {"pixel": pixel, "image": image}


def pretrain(dataset_dir: str | Path, index: dict, split: dict, *, arch: str, conv_dim: int, mask_dim: int,
             gn_groups: int, crop_size: int, scale: tuple[float, float], iterations: int, batch_size: int,
             lr: float, weight_decay: float, seed: int, photometric: bool = True, log_interval: int = 10,
             device: str = "cpu",
             progress: bool = True) -> tuple[PretrainNet, list[dict]]:
    """Train :class:`PretrainNet`; returns it and the curve (one record per ``log_interval``)."""
    usable = [i for i, e in enumerate(index["train"]) if e["usable"]]
    if not usable:
        raise ValueError("the training split has no usable images (index.json 'train' has none marked usable)")
    k = int(split["num_classes"])
    torch.manual_seed(seed)
    dev = torch.device(device)
    net = PretrainNet(arch, k, conv_dim, mask_dim, gn_groups).to(dev)
    base_ids = torch.tensor(split["base"], dtype=torch.long, device=dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, iterations // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / iterations) ** 0.9)
    data = TrainCrops(dataset_dir, index["train"], crop_size, scale, seed, photometric=photometric)
    sampler = RandomBatchSampler(usable, batch_size, seed + 1)
    curve, running, t0 = [], {}, time.perf_counter()
    net.train()
    for step in tqdm(range(iterations), desc="pretrain", unit="it", disable=not progress, dynamic_ncols=True):
        batch = collate_train([data[(i, step, slot)] for slot, i in enumerate(sampler.batch(step))])
        pixel_logits, image_logits = net(batch["image"].to(dev).float())
        losses = weak_shot_pretrain_losses(pixel_logits, image_logits, batch["sem_seg"].to(dev), base_ids, k)
        loss = losses["pixel"] + losses["image"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain: non-finite loss at step {step + 1}: "
                                     + ", ".join(f"{n} = {v.item()}" for n, v in losses.items()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for n, v in losses.items():
            running[n] = running.get(n, 0.0) + v.item()
        if (step + 1) % log_interval == 0 or step + 1 == iterations:
            n = (step + 1) % log_interval or log_interval
            curve.append({"step": step + 1, **{k_: v / n for k_, v in running.items()},
                          "loss": sum(running.values()) / n, "lr": opt.param_groups[0]["lr"],
                          "seconds": time.perf_counter() - t0})
            running = {}
    return net.eval(), curve


def weak_shot_init(p, dataset_dir: str | Path, index: dict, split: dict, *,
                   progress: bool = True) -> tuple[dict, list[dict]]:
    """The pretrain stage's work for the params ``p`` (:class:`pipeline.config.Params`) on one split:
    the content of its ``init.pt`` and the pre-training curve. With ``model.pretrained`` other than
    ``weak_shot`` nothing trains: a placeholder ``{"used": False, "reason"}`` and no curve. Uses
    ``train.threads`` torch threads when that is not 0, on ``train.device``. Nothing is written: the
    caller saves the file (atomically)."""
    from .device import resolve_device
    if p.model.pretrained != "weak_shot":
        return {"used": False, "reason": f"model.pretrained is {p.model.pretrained!r}"}, []
    if p.train.threads:
        torch.set_num_threads(p.train.threads)
    i = p.pretrain
    net, curve = pretrain(dataset_dir, index, split, arch=p.model.backbone, conv_dim=p.model.conv_dim,
                          mask_dim=p.model.mask_dim, gn_groups=p.model.gn_groups, crop_size=p.data.crop_size,
                          scale=(p.data.scale_min, p.data.scale_max), iterations=i.iterations,
                          batch_size=i.batch_size, lr=i.lr, weight_decay=p.train.weight_decay, seed=p.base.seed,
                          photometric=p.data.photometric, device=str(resolve_device(p.train.device)),
                          progress=progress)
    return {"used": True, **initial_state(net), "arch": p.model.backbone, "steps": i.iterations,
            "seconds": curve[-1]["seconds"] if curve else 0.0}, curve


_TORCHVISION_NAMES = {"stem.0.": "conv1.", "stem.1.": "bn1.", "res2.": "layer1.", "res3.": "layer2.",
                      "res4.": "layer3.", "res5.": "layer4."}


def initial_state(net: PretrainNet) -> dict[str, dict]:
    """What a MaskFormer takes from the pretrained net: ``{"backbone": torchvision ResNet state
    dict (also usable as ``model.pretrained: <file>``), "pixel_decoder": FPNPixelDecoder state}``."""
    backbone = {}
    for k, v in net.backbone.state_dict().items():
        prefix = next(p for p in _TORCHVISION_NAMES if k.startswith(p))
        backbone[_TORCHVISION_NAMES[prefix] + k[len(prefix):]] = v.detach().cpu()
    return {"backbone": backbone,
            "pixel_decoder": {k: v.detach().cpu() for k, v in net.pixel_decoder.state_dict().items()}}


def load_init(path: str | Path | None, pretrained: str) -> dict | None:
    """The pretrain stage's output (``init.pt``) when ``model.pretrained`` (``pretrained``) is
    ``weak_shot``, else None; errors name the file and the stage that writes it."""
    if pretrained != "weak_shot":
        return None
    if path is None:
        raise ValueError("model.pretrained is 'weak_shot': pass the pretrain stage's output with --init "
                         "(dvc.yaml does)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"'{path}' is missing: run the pretrain stage first (dvc repro)") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"'{path}' is not a weak-shot initialisation file the pretrain stage wrote: {e}") from None
    if not isinstance(ck, dict) or not ck.get("used"):
        raise ValueError(f"'{path}' was written while model.pretrained was not weak_shot: re-run the pretrain "
                         "stage (dvc repro)")
    return ck
