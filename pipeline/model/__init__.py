"""MaskFormer (backbone, FPN pixel decoder, transformer decoder, heads) and SimNet."""
from .maskformer import MaskFormer, semantic_inference  # noqa: F401
from .build import build_model  # noqa: F401
