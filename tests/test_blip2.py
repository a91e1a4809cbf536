"""BLIP-2 against transformers on random tiny models, converted from their own saved files:
Blip2ForConditionalGeneration with OPT and Llama (logits, loss, greedy generation with and
without a prompt) and Blip2ForImageTextRetrieval (ITM and ITC scores); the key map failing loudly."""

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from polymodal.checkpoints import hf_blip2  # noqa: E402
from polymodal.checkpoints.hf_blip2 import load_hf_blip2  # noqa: E402
from polymodal.checkpoints.state import CheckpointError  # noqa: E402
from polymodal.config import (  # noqa: E402
    Blip2Config,
    ConfigError,
    LMConfig,
    QFormerConfig,
    VisionConfig,
    config_from_dict,
)
from polymodal.models.blip2 import Blip2, Blip2Stage1, image_features  # noqa: E402

Q, VOCAB, IMAGE_TOKEN = 4, 99, 98
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, initializer_range=0.02)
QFORMER = dict(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
               max_position_embeddings=20)  # layers 0 and 2 cross-attend
LMS = {
    "opt": ("OPT", dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                        max_position_embeddings=64, bos_token_id=2, eos_token_id=2, pad_token_id=1)),
    "llama": ("Llama", dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=40, max_position_embeddings=64, bos_token_id=2,
                            eos_token_id=2, pad_token_id=0)),
}


def _noise(model, scale=0.1):
    """Noise on every weight (query tokens and norms included), so a swapped or skipped one shows
    (and, at 0.3, so a tiny LM's greedy continuations do not collapse into one repeated token)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf-blip2"))


@functools.cache
def generator_pair(lm: str, root: str):
    arch, kwargs = LMS[lm]
    torch.manual_seed(1)
    text = getattr(transformers, f"{arch}Config")(**kwargs)
    cfg = transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=text.to_dict(),
                                   num_query_tokens=Q, image_token_index=IMAGE_TOKEN)
    ref = _noise(transformers.Blip2ForConditionalGeneration(cfg), scale=0.3)
    d = Path(root) / lm
    ref.save_pretrained(d)
    return ref, load_hf_blip2(d), d


@functools.cache
def retrieval_pair(root: str):
    torch.manual_seed(0)
    cfg = transformers.Blip2Config(vision_config=VISION, qformer_config=dict(QFORMER, use_qformer_text_input=True),
                                   num_query_tokens=Q, image_text_hidden_size=16)
    ref = _noise(transformers.Blip2ForImageTextRetrieval(cfg))
    d = Path(root) / "itm"
    ref.save_pretrained(d)
    return ref, load_hf_blip2(d), d


def pixels(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def texts(pad: int, lengths=(6, 4, 2), T=6, left=True, low=3, high=90, seed=2):
    """Padded random text (B, T) and its mask: left-padded (prompts) or right-padded (training)."""
    ids = torch.randint(low, high, (len(lengths), T), generator=torch.Generator().manual_seed(seed))
    pos = torch.arange(T)
    mask = torch.stack([pos >= T - L if left else pos < L for L in lengths]).long()
    return ids.masked_fill(mask == 0, pad), mask


def hf_inputs(ids, mask):
    """transformers' layout: the image placeholder tokens first, then the (padded) text."""
    B = ids.shape[0]
    full = torch.cat([torch.full((B, Q), IMAGE_TOKEN), ids], 1)
    return full, torch.cat([torch.ones(B, Q, dtype=mask.dtype), mask], 1)


@pytest.mark.parametrize("lm", ["opt", "llama"])
def test_generation_model_logits_and_loss(lm, root):
    ref, ours, _ = generator_pair(lm, root)
    pad = ours.cfg.lm.pad_token_id
    px = pixels()
    ids, mask = texts(pad)  # left-padded
    full, full_mask = hf_inputs(ids, mask)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # Llama's forward does not derive them from the mask
    with torch.no_grad():
        want = ref(pixel_values=px, input_ids=full, attention_mask=full_mask, position_ids=positions).logits
        got = ours(px, ids, mask)
        eager = ours(px, ids, mask, eager=True)
    real = full_mask.bool()
    assert got.logits.shape == (3, Q + 6, VOCAB) and got.loss is None
    assert (got.logits[real] - want[real]).abs().max() <= 1e-4
    assert (eager.logits[real] - got.logits[real]).abs().max() <= 1e-4

    # the loss: text targets only, on right-padded text (a left pad would sit between queries and text)
    ids, mask = texts(pad, left=False)
    targets = ids.masked_fill(mask == 0, -100)
    full, full_mask = hf_inputs(ids, mask)
    labels = torch.cat([torch.full((3, Q), -100), targets], 1)
    with torch.no_grad():
        want = ref(pixel_values=px, input_ids=full, attention_mask=full_mask, labels=labels)
        got = ours(px, ids, mask, targets=targets)
    assert abs(got.loss.item() - want.loss.item()) <= 1e-4


@pytest.mark.parametrize("lm", ["opt", "llama"])
def test_generation_model_greedy_generate(lm, root):
    ref, ours, _ = generator_pair(lm, root)
    pad = ours.cfg.lm.pad_token_id
    px = pixels()
    ids, mask = texts(pad)
    full, full_mask = hf_inputs(ids, mask)
    opts = dict(max_new_tokens=8, do_sample=False, eos_token_id=2, pad_token_id=pad)
    want = ref.generate(pixel_values=px, input_ids=full, attention_mask=full_mask, **opts)[:, full.shape[1]:]
    got = ours.generate(px, ids, mask, max_new_tokens=8)
    assert torch.equal(got.tokens, want)

    # no prompt: a caption from BOS alone, as transformers starts it
    want = ref.generate(pixel_values=px, **opts)[:, Q + 1:]
    got = ours.generate(px, max_new_tokens=8)
    assert torch.equal(got.tokens, want)


def test_retrieval_model_itm_and_itc(root):
    ref, ours, _ = retrieval_pair(root)
    assert isinstance(ours, Blip2Stage1) and ours.qformer.lm_head is None
    px = pixels()
    ids, mask = texts(0, lengths=(7, 5, 3), T=7, left=False, low=1, high=50)
    with torch.no_grad():
        itm = ref(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        itc = ref(pixel_values=px, input_ids=ids, attention_mask=mask)
        got = ours(px, ids, mask)
        img, txt = ours.image_embeds(px), ours.text_embeds(ids, mask)
    assert got.itm.shape == (3, 2) and got.itc.shape == (3, 3) and got.itg is None
    assert (got.itm - itm.logits_per_image).abs().max() <= 1e-5
    assert (got.itc - itc.logits_per_image).abs().max() <= 1e-5
    assert (ours.itm_logits(px, ids, mask) - got.itm).abs().max() <= 1e-6
    assert (ours.itc_scores(img, txt[:2]) - got.itc[:, :2]).abs().max() <= 1e-6  # N images x M texts
    assert (img - itc.image_embeds).abs().max() <= 1e-5 and (txt - itc.text_embeds).abs().max() <= 1e-5


def test_vision_tower_normalises_every_token(root):
    ref, ours, _ = retrieval_pair(root)
    with torch.no_grad():
        want = ref.vision_model(pixel_values=pixels()).last_hidden_state
        got = image_features(ours.visual, pixels())
    assert got.shape == (3, 1 + 16, 32) and (got - want).abs().max() <= 1e-5


def test_vision_without_qkv_bias_converts_with_zero_bias():
    torch.manual_seed(0)
    cfg = transformers.Blip2Config(vision_config=dict(VISION, qkv_bias=False), qformer_config=QFORMER,
                                   text_config=transformers.OPTConfig(**LMS["opt"][1]).to_dict(), num_query_tokens=Q,
                                   image_token_index=IMAGE_TOKEN)
    ref = _noise(transformers.Blip2ForConditionalGeneration(cfg))
    ours_cfg = hf_blip2.config_from_hf(ref.config.to_dict())
    ours = Blip2(ours_cfg).eval()
    ours.load_state_dict(hf_blip2.state_from_hf(ref.state_dict(), ours_cfg), strict=True)
    with torch.no_grad():
        want = ref.vision_model(pixel_values=pixels()).last_hidden_state
        assert (image_features(ours.visual, pixels()) - want).abs().max() <= 1e-5


def test_key_map_fails_loudly(root):
    _, _, d = generator_pair("opt", root)
    state = load_file(str(d / "model.safetensors"))
    cfg = hf_blip2.config_from_hf(json.loads((d / "config.json").read_text()))
    hf_blip2.state_from_hf(state, cfg)
    with pytest.raises(CheckpointError, match="unused key.*qformer.extra"):
        hf_blip2.state_from_hf({**state, "qformer.extra": torch.zeros(1)}, cfg)
    with pytest.raises(CheckpointError, match="under 'language_model.'.*unused key.*'extra'"):
        hf_blip2.state_from_hf({**state, "language_model.extra": torch.zeros(1)}, cfg)
    broken = {k: v for k, v in state.items() if "crossattention" not in k}
    with pytest.raises(CheckpointError, match="missing key.*crossattention"):
        hf_blip2.state_from_hf(broken, cfg)
    t5 = dict(json.loads((d / "config.json").read_text()), text_config={"model_type": "t5", "is_encoder_decoder": True})
    with pytest.raises(CheckpointError, match="'t5' language model is not supported"):
        hf_blip2.config_from_hf(t5)
    with pytest.raises(CheckpointError, match="not a transformers BLIP-2"):
        load_hf_blip2(d.parent)


def test_loaded_config_round_trips_and_reads_the_lm(root):
    _, ours, d = generator_pair("llama", root)
    cfg = ours.cfg
    assert cfg.lm.family == "llama" and cfg.lm.kv_heads == 2 and cfg.qformer.num_query_tokens == Q
    assert not cfg.vision.pre_norm and cfg.vision.patch_bias and not cfg.qformer.text_input
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    stage1 = Blip2Config(lm=None, qformer=QFormerConfig())
    assert config_from_dict(json.loads(json.dumps(stage1.to_dict()))) == stage1


def test_loss_scores_text_only_and_generation_without_cache():
    torch.manual_seed(0)
    lm = LMConfig(family="opt", vocab_size=40, width=16, layers=1, heads=2, mlp_dim=24, act="relu", norm_eps=1e-5,
                  max_positions=32, tie_embeddings=True, qkv_bias=True, out_bias=True, mlp_bias=True, eos_token_id=None)
    vision = VisionConfig(image_size=32, patch_size=8, width=16, layers=1, heads=2, mlp_dim=24, act="gelu",
                          norm_eps=1e-6, pre_norm=False, patch_bias=True)
    cfg = Blip2Config(vision=vision, qformer=QFormerConfig(width=16, layers=2, heads=2, mlp_dim=24, num_query_tokens=3,
                                                          text_input=False, lm_head=False), lm=lm)
    model = Blip2(cfg).eval()
    px, ids = pixels(2), torch.randint(3, 40, (2, 5))
    out = model(px, ids, targets=ids)
    assert out.logits.shape == (2, 3 + 5, 40)
    text = out.logits[:, 2:-1]  # the last query predicts the first token, and so on
    manual = torch.nn.functional.cross_entropy(text.flatten(0, 1), ids.flatten())
    assert torch.allclose(out.loss, manual, atol=1e-6)
    cached, uncached = model.generate(px, ids, max_new_tokens=5), model.generate(px, ids, max_new_tokens=5, use_cache=False)
    assert torch.equal(cached.tokens, uncached.tokens) and cached.tokens.shape == (2, 5)
    with pytest.raises(ConfigError, match="needs a language model"):
        Blip2(Blip2Config(vision=vision, lm=None))


def test_instruction_in_queries_starts_every_query_from_the_question():
    """instruction_in_queries: each learned query starts from the question's mean projected word
    (padding not counted), on top of reading the question beside the queries; it needs instruction."""
    torch.manual_seed(0)
    lm = LMConfig(family="opt", vocab_size=40, width=16, layers=1, heads=2, mlp_dim=24, act="relu", norm_eps=1e-5,
                  max_positions=32, tie_embeddings=True, qkv_bias=True, out_bias=True, mlp_bias=True, eos_token_id=None)
    vision = VisionConfig(image_size=32, patch_size=8, width=16, layers=1, heads=2, mlp_dim=24, act="gelu",
                          norm_eps=1e-6, pre_norm=False, patch_bias=True)
    qformer = QFormerConfig(vocab_size=0, width=16, layers=2, heads=2, mlp_dim=24, num_query_tokens=3,
                            context_length=8, lm_head=False)
    cfg = Blip2Config(vision=vision, qformer=qformer, lm=lm, instruction=True, instruction_in_queries=True)
    model = _noise(Blip2(cfg))
    plain = Blip2(cfg.replace(instruction_in_queries=False)).eval()
    plain.load_state_dict(model.state_dict())  # the same weights: the option adds none
    px, question = pixels(1), torch.tensor([[5, 9, 12, 7]])
    padded, mask = torch.tensor([[5, 9, 12, 7, 1, 1]]), torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        fused = model.visual_prompt(px, instruction=question)
        words = model.instruction_proj(model.lm.embed(question))  # (1, 4, width)
        features = image_features(model.visual, px)
        by_hand = model.language_projection(model.qformer(features, text_embeds=words, query_offset=words.mean(1)).queries)
        torch.testing.assert_close(fused, by_hand, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.visual_prompt(px, instruction=padded, instruction_mask=mask), fused,
                                   atol=1e-5, rtol=1e-4)  # padding is not in the mean
        assert (fused - plain.visual_prompt(px, instruction=question)).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="needs an instruction-aware"):
        Blip2(cfg.replace(instruction=False))
