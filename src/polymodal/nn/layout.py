"""Weight layout for generating on a CPU: one token at a time, x (1, in) @ W.T.

A Linear keeps its weight as (out, in), row-major. For a single input row the product then reads
W one output row at a time, and a large matrix streams from memory at about a third of the speed
it does when its transpose (in, out) is the contiguous one (Whisper tiny.en's 51,864 x 384 logits:
9 ms against 3 ms on one core of this machine's CPU; bench/transcribe.py). `column_major_`
re-lays such weights in place: the same values, the same shape, only the strides change, so
every caller, state dict and optimizer sees the parameter it saw before.

MKL runs such a one-row product on one thread however many torch has. `split_linear` reads the
same storage as `parts` blocks of output columns in one batched product, which torch spreads
over its threads: on two threads Whisper tiny.en's logits take 2 ms instead of 3.

A weight whose every value is a float16 value (a checkpoint published in float16, like Whisper
tiny.en's model.bin) loses nothing stored in half the bytes. `one_row_layout_(..., half=True)`
keeps such weights a second time, packed as float16 for FBGEMM's product, which widens them to
float32 in registers and multiplies and adds in float32: the same products and sums as the float32
weight, in another order. A one-row product is bound by the bytes it reads, so it takes about 0.7
of the time (bench/transcribe.py; MODEL_CARD.md, "Speed"). Any other weight, no FBGEMM (not x86),
or gradients on: the float32 weight as before.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

# id(weight) -> (its data_ptr and _version when packed, the FBGEMM float16 pack); see `pack_half_`.
# An entry goes when its weight does (weakref.finalize).
_HALF_PACKS: dict[int, tuple] = {}


def fbgemm_half() -> bool:
    """Can this torch run FBGEMM's float16-weight product (x86 builds)?"""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized,
                                                                              "linear_dynamic_fp16")


def is_half_exact(w: Tensor) -> bool:
    """Is every value of w a float16 value (finite, in float16's range), so float16 storage loses nothing?"""
    h = w.detach().to(torch.float16)
    return bool(torch.isfinite(h).all()) and bool((h.to(w.dtype) == w.detach()).all())


def pack_half_(w: Tensor, bias: Tensor | None = None) -> bool:
    """Keep a float16 FBGEMM pack of a float32 CPU weight (out, in) whose values are all float16
    values, read by `split_linear` and `SplitLinear` instead of w. Returns whether it packed."""
    if w.device.type != "cpu" or w.dtype != torch.float32 or w.dim() != 2 or not fbgemm_half():
        return False
    if not is_half_exact(w):
        return False
    packed = torch.ops.quantized.linear_prepack_fp16(w.detach().contiguous(),
                                                     None if bias is None else bias.detach().float())
    if id(w) not in _HALF_PACKS:
        weakref.finalize(w, _HALF_PACKS.pop, id(w), None)
    _HALF_PACKS[id(w)] = ((w.data_ptr(), w._version, None if bias is None else (bias.data_ptr(), bias._version)),
                      packed)
    return True


def is_packed_half(w: Tensor) -> bool:
    """Does w have a current float16 pack (`pack_half_`)?"""
    held = _HALF_PACKS.get(id(w))
    return held is not None and held[0][:2] == (w.data_ptr(), w._version)


def _half_product(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor | None:
    """x @ w.T (+ bias) through w's float16 pack; None when w has none, or it is stale (w changed)."""
    held = _HALF_PACKS.get(id(w))
    if held is None or x.dtype != torch.float32:
        return None
    if held[0][:2] != (w.data_ptr(), w._version):  # w changed since: the pack is stale for good
        del _HALF_PACKS[id(w)]
        return None
    if held[0][2] != (None if bias is None else (bias.data_ptr(), bias._version)):
        return None  # another bias than the one packed
    y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, x.shape[-1]), held[1])
    return y.view(*x.shape[:-1], y.shape[-1])


def column_major_(module: nn.Module, *extra: Tensor) -> nn.Module:
    """Lay out every nn.Linear weight under `module`, and the `extra` weights (a tied LM head read
    through F.linear), so that W.T is contiguous. Weights on the CPU only: a GPU's kernels want
    the usual layout. Returns the module."""
    for w in [m.weight for m in module.modules() if isinstance(m, nn.Linear)] + list(extra):
        _transpose_storage(w)
    return module


def _transpose_storage(w: Tensor) -> None:
    """Make w.T the contiguous one (CPU weights only; the values and shape stay)."""
    if w.device.type == "cpu" and w.dim() == 2 and not w.t().is_contiguous():
        w.data = w.data.t().contiguous().t()


def split_linear(x: Tensor, weight: Tensor, parts: int | None = None, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for a column-major weight (out, in), computed as `parts` products
    (default: two, or one on one thread) over blocks of its output columns, in one batched product
    on strided views of the weight (no copy). x (..., in) -> (..., out). Any other weight, `out` not
    divisible by `parts`, or a weight being trained (gradients on): F.linear."""
    if torch.is_grad_enabled() and weight.requires_grad or x.device.type != "cpu":
        return torch.nn.functional.linear(x, weight, bias)
    if (y := _half_product(x, weight, bias)) is not None:
        return y
    blocks = _column_blocks(weight, min(torch.get_num_threads(), 2) if parts is None else parts)
    if blocks is None:
        return torch.nn.functional.linear(x, weight, bias)
    return _blocks_product(x, blocks, None if bias is None else bias.view(parts, 1, -1))


def _column_blocks(weight: Tensor, parts: int) -> Tensor | None:
    """(parts, in, out / parts) views of a column-major weight: block p holds columns p * n .. (p + 1) * n."""
    out_f, in_f = weight.shape
    wt = weight.t()
    if parts < 2 or out_f % parts or not wt.is_contiguous():
        return None
    n = out_f // parts
    return wt.as_strided((parts, in_f, n), (n, out_f, 1))


def _blocks_product(x: Tensor, blocks: Tensor, bias: Tensor | None) -> Tensor:
    parts, in_f, n = blocks.shape
    rows = x.reshape(-1, in_f).expand(parts, -1, -1)  # (parts, R, in)
    y = torch.bmm(rows, blocks) if bias is None else torch.baddbmm(bias, rows, blocks)  # (parts, R, n)
    return y.permute(1, 0, 2).reshape(*x.shape[:-1], parts * n)


class SplitLinear(nn.Linear):
    """An nn.Linear whose column-major weight is read in two blocks over torch's threads
    (`split_linear`). `one_row_layout_` turns a decoder's Linears into these: the same parameters
    and state dict, only the product's schedule differs. The block views are kept between calls
    (a decoding step makes twenty of these calls, each a few microseconds of work to set up);
    with gradients on, it is a plain Linear."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad or x.device.type != "cpu":
            return torch.nn.functional.linear(x, self.weight, self.bias)
        if (y := _half_product(x, self.weight, self.bias)) is not None:
            return y
        parts, w, b = min(torch.get_num_threads(), 2), self.weight, self.bias
        key = (parts, w.data_ptr(), w._version, None if b is None else (b.data_ptr(), b._version))
        held = self.__dict__.get("_blocks")
        if held is None or held[0] != key:
            blocks = _column_blocks(w, parts)
            held = self.__dict__["_blocks"] = (key, blocks, None if b is None or blocks is None else b.view(parts, 1, -1))
        if held[1] is None:
            return torch.nn.functional.linear(x, w, b)
        return _blocks_product(x, held[1], held[2])


def one_row_layout_(module: nn.Module, *extra: Tensor, half: bool = False) -> nn.Module:
    """The fastest layout measured on this machine's CPU for one-row products (bench/transcribe.py):
    a Linear that widens or keeps its width (out >= in) goes column-major and is read in two
    blocks (`SplitLinear`); one that narrows (Whisper's MLP down-projection, 1,536 -> 384) stays
    (or goes back to) row-major, which streams it faster (cold, two threads: 170 us against 180
    split, 255 plain column-major; widening 384 -> 1,536: 110 us split, 125 plain, 170
    row-major). The `extra` weights (a tied LM head) go column-major. Returns the module.

    half: also keep a float16 pack of every weight whose values are all float16 values
    (`pack_half_`, the module's notes); the products then read it."""
    for m in module.modules():
        if type(m) is nn.Linear and m.out_features >= m.in_features:
            column_major_(m)
            m.__class__ = SplitLinear
        elif type(m) is nn.Linear and m.weight.device.type == "cpu" and not m.weight.is_contiguous():
            m.weight.data = m.weight.data.contiguous()  # laid out column-major before: back to row-major
        if half and isinstance(m, nn.Linear) and pack_half_(m.weight, m.bias):
            m.__class__ = SplitLinear
    for w in extra:
        _transpose_storage(w)
        if half:
            pack_half_(w)
    return module


__all__ = ["SplitLinear", "column_major_", "fbgemm_half", "is_half_exact", "is_packed_half", "one_row_layout_", "pack_half_",
           "split_linear"]
