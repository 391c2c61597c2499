"""SimNet: the pixel-pair similarity network of SimFormer (paper: "SimNet", used by SimLoss
and as the teacher of DistLoss).

Input: the concatenation of two pixel features (``2*C`` channels, ``C`` = ``mask_dim``).
A 1x1 convolution over a set of pixel pairs is a per-pair linear map, so every layer is a
``Linear`` over the pair axis followed by ``BatchNorm1d`` over that axis (the pairs are the
batch of the normalisation): a stem ``2C -> width`` (linear + BN + ReLU), three residual
blocks of (linear + BN + ReLU) at ``width``, and a 2-way head. Softmax over the two
channels; the similarity probability is channel 1 ("same class"). ``block_convs=2`` gives the
released code's block instead: two (linear + BN) per block, ``ReLU(x + BN(W2 ReLU(BN(W1 x))))``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ResidualBlock(nn.Module):
    """``y = ReLU(x + BN(W x))``: a 1x1 conv + BatchNorm + ReLU with an identity shortcut; with
    ``convs=2``, ``y = ReLU(x + BN(W2 ReLU(BN(W1 x))))`` (the released code's block)."""

    def __init__(self, width: int, convs: int = 1):
        super().__init__()
        layers = [nn.Linear(width, width, bias=False), nn.BatchNorm1d(width)]
        if convs == 2:
            layers += [nn.ReLU(), nn.Linear(width, width, bias=False), nn.BatchNorm1d(width)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class SimNet(nn.Module):
    """Pixel-pair similarity: ``forward(f_a, f_b)`` with ``f_a``, ``f_b`` of shape ``P x C``
    returns ``P`` probabilities that pixel ``f_a[p]`` and pixel ``f_b[p]`` share a class.

    ``in_dim`` is ``C`` (one pixel's feature size); the network sees ``2*C`` channels.
    In training mode BatchNorm normalises over the ``P`` pairs of the call, so ``P`` must be
    greater than 1 there.
    """

    def __init__(self, in_dim: int, width: int = 256, num_blocks: int = 3, block_convs: int = 1):
        super().__init__()
        if in_dim < 1 or width < 1 or num_blocks < 0 or block_convs not in (1, 2):
            raise ValueError(f"SimNet: bad sizes in_dim={in_dim}, width={width}, num_blocks={num_blocks}, "
                             f"block_convs={block_convs} (1 or 2)")
        self.in_dim = in_dim
        self.width = width
        self.stem = nn.Sequential(nn.Linear(2 * in_dim, width, bias=False), nn.BatchNorm1d(width), nn.ReLU())
        self.blocks = nn.Sequential(*[_ResidualBlock(width, block_convs) for _ in range(num_blocks)])
        self.head = nn.Linear(width, 2)

    def logits(self, f_a: torch.Tensor, f_b: torch.Tensor) -> torch.Tensor:
        """``P x 2`` logits (channel 0: different class, channel 1: same class)."""
        if f_a.dim() != 2 or f_a.shape != f_b.shape or f_a.shape[1] != self.in_dim:
            raise ValueError(f"SimNet expects two P x {self.in_dim} tensors, got {tuple(f_a.shape)} "
                             f"and {tuple(f_b.shape)}")
        x = torch.cat([f_a, f_b], dim=1)
        return self.head(self.blocks(self.stem(x)))

    def forward(self, f_a: torch.Tensor, f_b: torch.Tensor) -> torch.Tensor:
        """``P`` similarity probabilities (softmax channel 1)."""
        return torch.softmax(self.logits(f_a, f_b).float(), dim=1)[:, 1]
