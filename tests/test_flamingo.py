"""Flamingo: the invariants (zero gates = the frozen LM, frozen parts stay bit-identical, the resampler's
shape for any number of frames, a token never sees a later image) and parity with transformers' IDEFICS
(v1) on tiny random models converted from its own saved files (logits, greedy generation, the media
masks its processor builds)."""

import functools
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from polymodal.checkpoints.hf_idefics import load_hf_idefics  # noqa: E402
from polymodal.checkpoints.state import CheckpointError  # noqa: E402
from polymodal.config import (  # noqa: E402
    FlamingoConfig,
    LMConfig,
    PerceiverConfig,
    VisionConfig,
    config_from_dict,
)
from polymodal.generation import generate  # noqa: E402
from polymodal.models.flamingo import Flamingo, media_index  # noqa: E402
from polymodal.models.perceiver import PerceiverResampler  # noqa: E402

VOCAB, EXTRA, IMAGE, EOS = 90, 2, 91, 2  # <fake_token_around_image> 90, <image> 91 (the extra rows)


def tiny_config(**changes) -> FlamingoConfig:
    cfg = FlamingoConfig(
        vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=4, mlp_dim=64, act="gelu"),
        perceiver=PerceiverConfig(latents=4, depth=2, heads=2, head_dim=8, max_frames=16),
        lm=LMConfig(family="llama", vocab_size=VOCAB + EXTRA, width=32, layers=4, heads=4, mlp_dim=48,
                    max_positions=64, bos_token_id=1, eos_token_id=EOS, pad_token_id=0),
        cross_every=2, image_token_id=IMAGE, end_of_chunk_token_id=EOS)
    return cfg.replace(**changes)


def _open_gates(model, scale=0.5):
    with torch.no_grad():
        for block in model.xattn:
            block.attn_gate.normal_(0, scale)
            block.ff_gate.normal_(0, scale)
    return model


# --- invariants ------------------------------------------------------------------------------


def _prompt(B=2, T=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    ids[:, 1], ids[:, 7] = IMAGE, IMAGE  # two images per row
    return ids


def test_zero_gates_equal_the_frozen_lm_exactly():
    torch.manual_seed(0)
    model = Flamingo(tiny_config()).eval()
    ids, px = _prompt(), torch.randn(2, 2, 3, 16, 16)
    with torch.no_grad():
        got = model(ids, pixels=px).logits
        want = model.lm(ids).logits
    assert torch.equal(got, want)
    _open_gates(model)
    with torch.no_grad():
        assert not torch.allclose(model(ids, pixels=px).logits, want)  # the pathway is real once open


def test_resampler_gives_the_same_shape_for_1_4_16_frames():
    torch.manual_seed(0)
    cfg = tiny_config().perceiver
    resampler = PerceiverResampler(32, cfg)
    shapes = {tuple(resampler(torch.randn(3, f, 5, 32)).shape) for f in (1, 4, 16)}
    assert shapes == {(3, cfg.latents, 32)}
    with pytest.raises(ValueError, match="at most 16"):
        resampler(torch.randn(1, 17, 5, 32))
    model = Flamingo(tiny_config()).eval()
    for frames in (1, 4, 16):  # through the whole model: video (B, M, F, C, H, W)
        assert model.encode_media(torch.randn(1, 1, frames, 3, 16, 16)).shape == (1, 1, 4, 32)


def test_media_index_follows_the_latest_image_and_end_of_chunk():
    ids = torch.tensor([[5, IMAGE, 6, 7, IMAGE, 8, EOS, 9, IMAGE, 10]])
    assert media_index(ids, IMAGE).tolist() == [[-1, 0, 0, 0, 1, 1, 1, 1, 2, 2]]
    assert media_index(ids, IMAGE, EOS).tolist() == [[-1, 0, 0, 0, 1, 1, 1, -1, 2, 2]]


def test_a_token_never_sees_a_later_image():
    torch.manual_seed(0)
    model = _open_gates(Flamingo(tiny_config())).eval()
    ids, px = _prompt(), torch.randn(2, 2, 3, 16, 16)
    px2 = px.clone()
    px2[:, 1] += torch.randn_like(px2[:, 1])  # the second image (at position 7) changes
    with torch.no_grad():
        a, b = model(ids, pixels=px).logits, model(ids, pixels=px2).logits
    assert torch.equal(a[:, :7], b[:, :7])  # before the second image: untouched, bit for bit
    assert not torch.allclose(a[:, 7:], b[:, 7:])  # at and after it: changed
    with torch.no_grad():  # the first image changes the tokens that see it, not the ones before it
        c = model(ids, pixels=torch.stack([px[:, 0] + 1, px[:, 1]], 1)).logits
    assert torch.equal(a[:, :1], c[:, :1]) and not torch.allclose(a[:, 1:7], c[:, 1:7])


def test_training_changes_only_resampler_and_gated_blocks():
    torch.manual_seed(0)
    model = Flamingo(tiny_config())
    model.freeze_pretrained()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids, px = _prompt(), torch.randn(2, 2, 3, 16, 16)
    for _ in range(3):
        loss = model(ids, pixels=px, targets=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for k in before:
        frozen = k.startswith(("vision.", "lm."))
        assert torch.equal(before[k], after[k]) == frozen, k
    assert any(k.startswith("resampler.") for k in before) and any(".attn_gate" in k for k in before)


def test_cached_generation_equals_recomputing():
    torch.manual_seed(0)
    model = _open_gates(Flamingo(tiny_config())).eval()
    ids, px = _prompt(), torch.randn(2, 2, 3, 16, 16)
    fast = model.generate(ids, pixels=px, max_new_tokens=6, eos_token_id=None)
    slow = model.generate(ids, pixels=px, max_new_tokens=6, eos_token_id=None, use_cache=False)
    assert torch.equal(fast.tokens, slow.tokens)
    beams = model.generate(ids, pixels=px, max_new_tokens=4, num_beams=3, eos_token_id=None)
    assert beams.tokens.shape == (2, 4)
    assert generate(model.lm, ids, max_new_tokens=3).tokens.shape == (2, 3)  # the plain LM still generates


def test_config_round_trip():
    cfg = tiny_config(gate="vector", xattn_qk_norm=True)
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.cross_layers == 2


# --- parity with transformers' IDEFICS ---------------------------------------------------------


def _idefics(root: str, alpha_type: str, qk: bool, tie: bool):
    torch.manual_seed(1)
    cfg = transformers.IdeficsConfig(
        vocab_size=VOCAB, additional_vocab_size=EXTRA, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, cross_layer_interval=2, qk_layer_norms=qk, alpha_type=alpha_type,
        max_position_embeddings=64,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=EOS, pad_token_id=0, use_resampler=True,
        vision_config=dict(embed_dim=32, image_size=16, patch_size=8, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=4, resampler_depth=2, resampler_n_heads=2,
                              resampler_head_dim=8, qk_layer_norms_perceiver=qk))
    ref = transformers.IdeficsForVisionText2Text(cfg)
    with torch.no_grad():  # noise on every weight (norms and gates too), so a swapped one shows
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ref.eval()
    path = Path(root) / f"idefics-{alpha_type}-{qk}-{tie}"
    ref.save_pretrained(path)
    return ref, load_hf_idefics(path), path


@functools.cache
def _pair(root: str, alpha_type: str, qk: bool, tie: bool):
    return _idefics(root, alpha_type, qk, tie)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf-idefics"))


def _inputs():
    ids = torch.tensor([[1, 90, IMAGE, 90, 5, 6, 7, 90, IMAGE, 90, 8, 9, EOS, 10, 11],
                        [0, 0, 0, 1, 90, IMAGE, 90, 12, 13, 14, 90, IMAGE, 90, 15, 16]])
    mask = (ids != 0).long()
    mask[0, 0] = 1
    px = torch.randn(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    return ids, mask, px


def _hf_image_mask(ids):
    """transformers' processor rule (image_attention_mask_for_packed_input_ids) -> (B, T, 2) one-hot."""
    from transformers.models.idefics.processing_idefics import (
        image_attention_mask_for_packed_input_ids,
        incremental_to_binary_attention_mask,
    )

    class Tok:
        eos_token_id = EOS

        def convert_tokens_to_ids(self, token):
            return IMAGE

    incremental, _ = image_attention_mask_for_packed_input_ids(ids, Tok(), "pt")
    return incremental_to_binary_attention_mask(incremental, "pt", num_classes=2)


@pytest.mark.parametrize("alpha_type,qk,tie", [("float", False, False), ("vector", True, True)])
def test_idefics_logits_parity(root, alpha_type, qk, tie):
    ref, ours, _ = _pair(root, alpha_type, qk, tie)
    ids, mask, px = _inputs()
    image_mask = _hf_image_mask(ids)
    assert torch.equal(ours.media_mask(ids, 2), image_mask.bool())  # our masks are the processor's
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, pixel_values=px, image_attention_mask=image_mask).logits
        got = ours(ids, pixels=px, attention_mask=mask).logits
    real = mask.bool()
    assert (got - want)[real].abs().max() <= 1e-4
    assert ours.cfg.image_token_id == IMAGE and ours.cfg.gate == alpha_type


@pytest.mark.parametrize("alpha_type,qk,tie", [("float", False, False), ("vector", True, True)])
def test_idefics_greedy_generation_parity(root, alpha_type, qk, tie):
    ref, ours, _ = _pair(root, alpha_type, qk, tie)
    ids, mask, px = _inputs()
    ids, mask = ids[:, :12], mask[:, :12]  # both rows end inside their last image's text
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=mask, pixel_values=px,
                            image_attention_mask=_hf_image_mask(ids), max_new_tokens=8, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    got = ours.generate(ids, pixels=px, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    assert got.tokens.tolist() == want.tolist()
    assert len(set(got.tokens.flatten().tolist())) > 2  # not one token repeated


def test_idefics_key_map_fails_loudly(root):
    from safetensors.torch import load_file

    from polymodal.checkpoints.hf_idefics import config_from_hf, state_from_hf

    ref, _, path = _pair(root, "float", False, False)
    state = load_file(path / "model.safetensors")
    cfg = config_from_hf(ref.config.to_dict(), image_token_id=IMAGE)
    with pytest.raises(CheckpointError, match="unused"):
        state_from_hf({**state, "model.extra.weight": torch.zeros(1)}, cfg)
    state.pop("model.perceiver_resampler.latents")
    with pytest.raises(CheckpointError, match="missing key"):
        state_from_hf(state, cfg)
