"""Building blocks every model composes: attention, MLP, norms, the transformer block."""

from polymodal.nn.attention import Attention, KVCache
from polymodal.nn.block import Block
from polymodal.nn.layout import SplitLinear, column_major_, fbgemm_half, one_row_layout_, split_linear
from polymodal.nn.mlp import MLP, quick_gelu
from polymodal.nn.norm import RMSNorm, make_norm

__all__ = ["MLP", "Attention", "Block", "KVCache", "RMSNorm", "SplitLinear", "column_major_", "fbgemm_half",
           "make_norm", "one_row_layout_", "quick_gelu", "split_linear"]
