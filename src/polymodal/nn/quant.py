"""Int8 dynamic quantization of Linear layers, for CPU inference.

Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", in its dynamic form: each Linear's weight is stored as
int8 with one scale per output row; each input is quantized to int8 on the fly (one scale
per call, from its range), the matmul runs in int8 with int32 accumulation (fbgemm / x86
VNNI), and the result is rescaled to float. Attention scores, norms and activations stay
fp32. PyTorch's `quantize_dynamic` does the work; this wraps it so callers ask for it once.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


def quantize_int8(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Every nn.Linear of `model` -> a dynamically quantized int8 Linear (CPU only).

    Returns the quantized model (a copy unless `inplace`); its forward takes and returns
    float tensors as before. Modules that read a Linear's `.weight` directly (a tied LM
    head, say) are not supported: this is for encoders that call their Linears.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 dynamic quantization runs on the CPU only; move the model to the CPU first")
    engines = torch.backends.quantized.supported_engines
    engine = next((e for e in ("x86", "fbgemm", "onednn", "qnnpack") if e in engines), None)
    if engine is None:
        raise RuntimeError(f"this PyTorch build has no int8 engine (supported: {engines})")
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation", category=UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        model = model if inplace else copy.deepcopy(model)
        # one weight scale per output row: per tensor, a single large row costs every other row precision
        return quantize_dynamic(model.float().eval(), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                inplace=True)


def is_quantized(model: nn.Module) -> bool:
    """Does `model` hold any dynamically quantized Linear?"""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return any(isinstance(m, DynamicLinear) for m in model.modules())
