"""CTranslate2's Whisper format (`model.bin`, spec `WhisperSpec`), read with NumPy alone.

The file (binary version 6): uint32 version, the spec name, uint32 revision, uint32 count, then
per variable its name, uint8 rank, uint32 dims, uint8 dtype (0 float32, 1 int8, 2 int16,
3 int32, 4 float16, 5 bfloat16), uint32 byte count and the bytes; then uint32 count and
(alias, variable) name pairs. Strings are a uint16 length (NUL included), the bytes and a NUL.

The Whisper layout maps onto ours nearly one to one: self-attention's q/k/v are fused already
(`linear_0`), cross-attention keeps q apart (`linear_0`) and fuses k/v (`linear_1`, the k slice of
its bias stored as zeros), LayerNorm is gamma/beta, both position tables are stored, and the
alias `decoder/projection/weight -> decoder/embeddings/weight` ties the output projection to the
token embedding. int8 weights (`weight_scale` beside them) are dequantised to float32. No
`ctranslate2` is needed at run time.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from polymodal.checkpoints.state import CheckpointError, StateReader
from polymodal.models.whisper import Whisper, WhisperConfig

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_GELU = 3  # CTranslate2's ActivationType::GELU


def read_ct2(path: str | Path) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """(spec name, {name: array}, {alias: variable}) of a CTranslate2 model.bin; arrays are views
    into the file's bytes (read once)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    buf = memoryview(path.read_bytes())
    pos = 0

    def take(fmt: str):
        nonlocal pos
        try:
            (v,) = struct.unpack_from(fmt, buf, pos)
        except struct.error:
            raise CheckpointError(f"{path}: truncated CTranslate2 model (ends at byte {pos})") from None
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = take("<H")
        s = bytes(buf[pos:pos + n - 1]).decode("utf-8", "replace")
        pos += n
        return s

    version = take("<I")
    if version != 6:
        raise CheckpointError(f"{path}: CTranslate2 binary version {version}; only version 6 is read")
    spec = string()
    take("<I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("<I")):
        name = string()
        dims = [take("<I") for _ in range(take("<B"))]
        dtype, nbytes = take("<B"), take("<I")
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: variable {name!r} has dtype id {dtype}, which is not read (bfloat16?)")
        if pos + nbytes > len(buf):
            raise CheckpointError(f"{path}: truncated CTranslate2 model (variable {name!r})")
        a = np.frombuffer(buf, dtype=_DTYPES[dtype], count=nbytes // np.dtype(_DTYPES[dtype]).itemsize, offset=pos)
        variables[name] = a.reshape(dims) if dims else a
        pos += nbytes
    aliases = {}
    if pos < len(buf):
        for _ in range(take("<I")):
            alias = string()
            aliases[alias] = string()
    return spec, variables, aliases


def _scalar(v: dict[str, np.ndarray], name: str, default=None):
    if name not in v:
        if default is None:
            raise CheckpointError(f"model.bin: missing {name!r}")
        return default
    return int(v[name].reshape(-1)[0])


def config_from_ct2(variables: dict[str, np.ndarray], extra: dict) -> WhisperConfig:
    """Shapes and scalars of model.bin plus its config.json (suppress_ids, suppress_ids_begin, lang_ids)."""
    v = variables
    if _scalar(v, "decoder/activation", _GELU) != _GELU:
        raise CheckpointError("model.bin: the decoder's activation is not GELU; not a Whisper model we read")
    if _scalar(v, "decoder/scale_embeddings", 0) or not _scalar(v, "decoder/pre_norm", 1):
        raise CheckpointError("model.bin: scaled embeddings or post-norm decoder; not a Whisper model we read")
    vocab, width = v["decoder/embeddings/weight"].shape
    n_layers = lambda side: sum(1 for k in v if k.startswith(f"{side}/layer_") and k.endswith("ffn/linear_0/bias"))  # noqa: E731
    multilingual = vocab >= 51865
    no_ts = 50363 if multilingual else 50362
    sot = 50258 if multilingual else 50257
    prefix = (sot, 50259, 50359) if multilingual else (sot,)  # <|en|> <|transcribe|>
    return WhisperConfig(
        n_mels=v["encoder/conv1/weight"].shape[1], vocab_size=vocab, width=width,
        encoder_layers=n_layers("encoder"), decoder_layers=n_layers("decoder"),
        encoder_heads=_scalar(v, "encoder/num_heads"), decoder_heads=_scalar(v, "decoder/num_heads"),
        encoder_mlp_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_mlp_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        eos_token_id=50257 if multilingual else 50256, no_timestamps_token_id=no_ts, prefix_ids=prefix,
        suppress_tokens=tuple(extra.get("suppress_ids", ())),
        begin_suppress_tokens=tuple(extra.get("suppress_ids_begin", ())))


class _CT2Reader(StateReader):
    """A StateReader over model.bin's variables that dequantises int8 weights (weight / weight_scale)."""

    def take(self, key: str) -> Tensor:
        a = super().take(key)
        scale_key = key.removesuffix("weight") + "weight_scale"
        if a.dtype == np.int8 and key.endswith("weight") and scale_key in self.state:
            scale = np.asarray(super().take(scale_key), dtype=np.float32)
            a = a.astype(np.float32) / (scale[:, None] if scale.ndim == 1 and a.ndim == 2 else scale)
        return torch.from_numpy(np.array(a, dtype=np.float32))


def state_from_ct2(variables: dict[str, np.ndarray], aliases: dict[str, str], cfg: WhisperConfig,
                   source: str = "model.bin") -> dict[str, Tensor]:
    src = _CT2Reader(variables, source)
    for name in ("decoder/activation", "decoder/alibi", "decoder/alignment_heads", "decoder/alignment_layer",
                 "decoder/num_heads", "decoder/pre_norm", "decoder/scale_embeddings",
                 "decoder/start_from_zero_embedding", "encoder/num_heads"):
        src.ignore(name)
    if aliases.get("decoder/projection/weight", "decoder/embeddings/weight") != "decoder/embeddings/weight":
        raise CheckpointError(f"{source}: the output projection is not the token embedding; not supported")
    state: dict[str, Tensor] = {}

    def linear(ct: str, ours: str) -> None:
        state[f"{ours}.weight"] = src.take(f"{ct}/weight")
        state[f"{ours}.bias"] = src.take(f"{ct}/bias")

    def norm(ct: str, ours: str) -> None:
        state[f"{ours}.weight"] = src.take(f"{ct}/gamma")
        state[f"{ours}.bias"] = src.take(f"{ct}/beta")

    linear("encoder/conv1", "encoder.conv1")
    linear("encoder/conv2", "encoder.conv2")
    state["encoder.pos_embed"] = src.take("encoder/position_encodings/encodings")
    state["decoder.pos_embed"] = src.take("decoder/position_encodings/encodings")
    state["decoder.token_embed.weight"] = src.take("decoder/embeddings/weight")
    for side, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        norm(f"{side}/layer_norm", f"{side}.norm")
        for i in range(n):
            c, o = f"{side}/layer_{i}", f"{side}.blocks.{i}"
            norm(f"{c}/self_attention/layer_norm", f"{o}.norm1")
            linear(f"{c}/self_attention/linear_0", f"{o}.attn.qkv")
            linear(f"{c}/self_attention/linear_1", f"{o}.attn.out")
            if side == "decoder":
                norm(f"{c}/attention/layer_norm", f"{o}.norm_x")
                linear(f"{c}/attention/linear_0", f"{o}.xattn.q")
                linear(f"{c}/attention/linear_1", f"{o}.xattn.kv")
                linear(f"{c}/attention/linear_2", f"{o}.xattn.out")
            norm(f"{c}/ffn/layer_norm", f"{o}.norm2")
            linear(f"{c}/ffn/linear_0", f"{o}.mlp.up")
            linear(f"{c}/ffn/linear_1", f"{o}.mlp.down")
    src.finish()
    return state


def is_ct2_whisper(directory: Path) -> bool:
    return (Path(directory) / "model.bin").is_file()


def load_ct2_whisper(directory: str | Path) -> Whisper:
    """A CTranslate2 Whisper directory (model.bin + config.json) -> `Whisper` in eval mode, float32."""
    from polymodal.checkpoints.state import load_exact

    d = Path(directory)
    spec, variables, aliases = read_ct2(d / "model.bin")
    if spec != "WhisperSpec":
        raise CheckpointError(f"{d / 'model.bin'}: a CTranslate2 {spec}, not a WhisperSpec")
    extra = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
    cfg = config_from_ct2(variables, extra)
    state = state_from_ct2(variables, aliases, cfg, str(d / "model.bin"))
    return load_exact(Whisper(cfg), state, str(d)).eval()


__all__ = ["config_from_ct2", "is_ct2_whisper", "load_ct2_whisper", "read_ct2", "state_from_ct2"]
