"""The one place that maps ``ModelConfig`` to constructor arguments."""
from __future__ import annotations

from ..config import ModelConfig
from .backbone import ResNetBackbone
from .maskformer import MaskFormer
from .pixel_decoder import FPNPixelDecoder
from .transformer_decoder import TransformerDecoder


def build_model(cfg: ModelConfig, num_classes: int, backbone_state: dict | None = None,
                pixel_decoder_state: dict | None = None) -> MaskFormer:
    """``backbone_state``: torchvision ResNet weights (see ``weights.load_backbone_state_dict``) or None;
    ``pixel_decoder_state``: an ``FPNPixelDecoder`` state dict (the weak-shot initialisation) or None."""
    backbone = ResNetBackbone(cfg.backbone, freeze_bn=cfg.freeze_bn, state_dict=backbone_state)
    pixel_decoder = FPNPixelDecoder(backbone.channels, cfg.conv_dim, cfg.mask_dim, cfg.gn_groups)
    if pixel_decoder_state is not None:
        pixel_decoder.load_state_dict(pixel_decoder_state)
    memory_dim = backbone.channels[-1] if cfg.transformer_in == "res5" else cfg.mask_dim
    decoder = TransformerDecoder(memory_dim, cfg.hidden_dim, cfg.nheads, cfg.dec_layers,
                                 cfg.dim_feedforward, cfg.dropout, cfg.num_queries)
    return MaskFormer(num_classes, backbone, pixel_decoder, decoder, cfg.mask_dim, cfg.transformer_in)
