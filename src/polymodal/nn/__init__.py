"""Building blocks every model composes: attention, MLP, norms, the transformer block."""

from polymodal.nn.attention import Attention, KVCache
from polymodal.nn.block import Block
from polymodal.nn.layout import column_major_
from polymodal.nn.mlp import MLP, quick_gelu
from polymodal.nn.norm import RMSNorm, make_norm

__all__ = ["MLP", "Attention", "Block", "KVCache", "RMSNorm", "column_major_", "make_norm", "quick_gelu"]
