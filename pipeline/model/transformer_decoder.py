"""DETR-style transformer decoder (post-norm) over the res5 feature map.

Learned queries attend to the projected res5 memory with a 2-D sine positional encoding.
Every layer's output (after the shared final LayerNorm) is returned for deep supervision.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def sine_position_encoding(x: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """2-D sine/cosine encoding of a B x C x H x W map, normalised to [0, 2*pi]; returns B x 2F x H x W."""
    b, _, h, w = x.shape
    ones = torch.ones(b, h, w, device=x.device, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = ones.cumsum(1)
    x_embed = ones.cumsum(2)
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)


class DecoderLayer(nn.Module):
    """Self-attention, cross-attention, FFN; each followed by residual + LayerNorm (post-norm)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(dim_feedforward, d_model))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt, memory, query_pos, pos):
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.drop1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        tgt2 = self.cross_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.drop2(tgt2))
        return self.norm3(tgt + self.drop3(self.ffn(tgt)))


class TransformerDecoder(nn.Module):
    def __init__(self, in_channels: int, d_model: int = 256, nhead: int = 8, num_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, num_queries: int = 100):
        super().__init__()
        self.input_proj = nn.Conv2d(in_channels, d_model, 1)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.layers = nn.ModuleList([DecoderLayer(d_model, nhead, dim_feedforward, dropout)
                                     for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d_model)
        self.d_model = d_model
        for p in self.layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, res5: torch.Tensor) -> torch.Tensor:
        """Returns L x B x Q x d: the normed output of every decoder layer."""
        src = self.input_proj(res5)
        pos = sine_position_encoding(src, self.d_model // 2).flatten(2).transpose(1, 2)
        memory = src.flatten(2).transpose(1, 2)
        b = memory.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        tgt = torch.zeros_like(query_pos)
        outs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, query_pos, pos)
            outs.append(self.norm(tgt))
        return torch.stack(outs)
