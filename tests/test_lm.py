"""Decoder LMs: parity with transformers' OPT, Llama and Qwen2 causal LMs on random tiny models,
converted from their own files: logits on left-padded batches, greedy, beam search, repetition
penalty, soft prompts; and the key map failing loudly."""

import copy
import functools

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from polymodal.checkpoints.hf_lm import config_from_hf, load_hf_lm  # noqa: E402
from polymodal.checkpoints.state import CheckpointError  # noqa: E402
from polymodal.config import ConfigError, LMConfig, config_from_dict  # noqa: E402
from polymodal.generation import generate  # noqa: E402
from polymodal.models.lm import DecoderLM  # noqa: E402

TOL = 1e-4
VOCAB, PROMPT = 97, 9
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, bos_token_id=2, eos_token_id=2)
OPT = dict(COMMON, ffn_dim=48, pad_token_id=1)
LLAMA = dict(COMMON, intermediate_size=40, pad_token_id=0)
CONFIGS = {
    "opt": ("OPT", dict(OPT)),
    "opt-proj": ("OPT", dict(OPT, word_embed_proj_dim=16)),
    "opt-350m-like": ("OPT", dict(OPT, word_embed_proj_dim=16, do_layer_norm_before=False)),  # post-norm
    "llama-gqa": ("Llama", dict(LLAMA, num_key_value_heads=2, rope_theta=500.0)),
    "llama-tied-bias-hd": ("Llama", dict(LLAMA, tie_word_embeddings=True, attention_bias=True, head_dim=12)),
    "qwen2": ("Qwen2", dict(LLAMA, num_key_value_heads=1, tie_word_embeddings=True)),
}


@functools.cache
def reference(name: str, seed: int = 0):
    """A random transformers causal LM, with noise on every weight (norms included) so a swapped or
    skipped parameter shows, and so the logits are far from uniform."""
    arch, kwargs = CONFIGS[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{arch}Config")(**kwargs)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@functools.cache
def converted(name: str, tmp_root: str):
    from pathlib import Path

    d = Path(tmp_root) / name
    reference(name).save_pretrained(d)
    return load_hf_lm(d), d


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf-lm"))


def prompts(pad: int, lengths=(PROMPT, 5, 2), seed: int = 1):
    """Left-padded random prompts (B, PROMPT) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), PROMPT), generator=g)
    mask = torch.zeros_like(ids)
    for i, L in enumerate(lengths):
        mask[i, PROMPT - L:] = 1
    return ids.masked_fill(mask == 0, pad), mask


def same(got, expect) -> bool:
    """Equal new tokens up to each row's end; transformers' beam search fills with eos, not pad,
    when pad_token_id is 0 (`pad or eos`), so what follows the end is not compared."""
    if got.tokens.shape != expect.shape:
        return False
    running = torch.arange(expect.shape[1]) < got.lengths[:, None]
    return torch.equal(got.tokens[running], expect[running])


def hf_generate(ref, ids, mask, **kw):
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, pad_token_id=ref.config.pad_token_id, **kw)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_parity_on_left_padded_batch(name, root):
    ref, (ours, _) = reference(name), converted(name, root)
    ids, mask = prompts(ref.config.pad_token_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # Llama's forward does not derive them from the mask
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        o = ours(ids, attention_mask=mask)
        o_eager = ours(ids, attention_mask=mask, eager=True)
    real = mask.bool()
    assert (o.logits - r)[real].abs().max().item() <= TOL
    assert (o_eager.logits - r)[real].abs().max().item() <= TOL
    assert torch.isfinite(o.logits).all()  # padding rows too: no empty softmax row
    with torch.no_grad():  # generation's first step: the last position's logits alone, the same values
        last = ours(ids, attention_mask=mask, logits="last").logits
    assert last.shape == (ids.shape[0], 1, o.logits.shape[-1]) and torch.allclose(last, o.logits[:, -1:], atol=1e-6)
    with pytest.raises(ValueError, match="no loss"):
        ours(ids, logits="last", targets=ids)
    # and unpadded, where transformers' defaults apply
    with torch.no_grad():
        diff = (ours(ids[:1]).logits - ref(input_ids=ids[:1]).logits).abs().max().item()
    assert diff <= TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_transformers(name, root):
    ref, (ours, _) = reference(name), converted(name, root)
    pad = ref.config.pad_token_id
    ids, mask = prompts(pad)
    # no end-of-sequence: 20 tokens for every row, single and left-padded batch
    expect = hf_generate(ref, ids, mask, do_sample=False, max_new_tokens=20, eos_token_id=None)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=20, pad_token_id=pad)
    assert torch.equal(got.tokens, expect)
    single = generate(ours, ids[:1], max_new_tokens=20)
    assert torch.equal(single.tokens, expect[:1])
    # an end-of-sequence that some rows reach (a token of row 1's continuation): rows stop at
    # different steps and are padded after, and the loop ends when all rows have stopped
    eos = int(expect[1, 4])
    expect = hf_generate(ref, ids, mask, do_sample=False, max_new_tokens=20, eos_token_id=eos)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(got.tokens, expect)
    assert int(got.lengths[1]) <= 5
    expect = hf_generate(ref, ids, mask, do_sample=False, max_new_tokens=20, eos_token_id=eos, min_new_tokens=8)
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=pad,
                   min_new_tokens=8)
    assert torch.equal(got.tokens, expect)


@pytest.mark.parametrize("name", ["opt-proj", "llama-tied-bias-hd"])
def test_decoding_layout_keeps_the_tokens(name, root):
    ref, (ours, _) = reference(name), converted(name, root)
    ours = copy.deepcopy(ours)
    ids, mask = prompts(ref.config.pad_token_id)
    before = generate(ours, ids, attention_mask=mask, max_new_tokens=12, pad_token_id=ref.config.pad_token_id)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    assert ours.for_decoding() is ours
    head = ours.token_embed.weight if ours.lm_head is None else ours.lm_head.weight
    assert head.t().is_contiguous() and ours.blocks[0].attn.qkv.weight.t().is_contiguous()
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())
    after = generate(ours, ids, attention_mask=mask, max_new_tokens=12, pad_token_id=ref.config.pad_token_id)
    assert torch.equal(after.tokens, before.tokens)


@pytest.mark.parametrize("name", ["opt-proj", "llama-gqa", "qwen2"])
def test_beam_search_equals_transformers(name, root):
    ref, (ours, _) = reference(name), converted(name, root)
    pad = ref.config.pad_token_id
    ids, mask = prompts(pad, seed=2)
    common = dict(do_sample=False, num_beams=3, max_new_tokens=12)
    expect = hf_generate(ref, ids, mask, eos_token_id=None, **common)
    got = generate(ours, ids, attention_mask=mask, pad_token_id=pad, **common)
    assert torch.equal(got.tokens, expect)
    # with an end-of-sequence that beams reach, under several length penalties
    eos = int(expect[0, 3])
    for penalty in (1.0, 0.0, 2.0, -1.0):
        expect = hf_generate(ref, ids, mask, eos_token_id=eos, length_penalty=penalty, **common)
        got = generate(ours, ids, attention_mask=mask, eos_token_id=eos, pad_token_id=pad,
                       length_penalty=penalty, **common)
        assert same(got, expect), penalty
    for early_stopping in (True, "never"):
        expect = hf_generate(ref, ids, mask, eos_token_id=eos, early_stopping=early_stopping, **common)
        got = generate(ours, ids, attention_mask=mask, eos_token_id=eos, pad_token_id=pad,
                       early_stopping=early_stopping, **common)
        assert same(got, expect), early_stopping
    # four beams, repetition penalty and min_new_tokens (unpadded: see the repetition test)
    ids, mask = prompts(pad, lengths=(PROMPT, PROMPT), seed=2)
    common = dict(common, num_beams=4, repetition_penalty=1.3, min_new_tokens=3)
    expect = hf_generate(ref, ids, mask, eos_token_id=eos, **common)
    got = generate(ours, ids, attention_mask=mask, eos_token_id=eos, pad_token_id=pad, **common)
    assert same(got, expect) and (got.lengths >= 3).all()


@pytest.mark.parametrize("name", ["opt", "llama-gqa"])
def test_repetition_penalty_equals_transformers(name, root):
    ref, (ours, _) = reference(name), converted(name, root)
    # unpadded prompts: transformers also penalises the pad id of a left-padded row, we do not
    ids, mask = prompts(ref.config.pad_token_id, lengths=(PROMPT, PROMPT))
    for penalty in (1.3, 0.7):
        expect = hf_generate(ref, ids, mask, do_sample=False, max_new_tokens=20, eos_token_id=None,
                             repetition_penalty=penalty)
        got = generate(ours, ids, attention_mask=mask, max_new_tokens=20, repetition_penalty=penalty)
        assert torch.equal(got.tokens, expect), penalty
        assert not torch.equal(got.tokens, generate(ours, ids, max_new_tokens=20).tokens)


@pytest.mark.parametrize("name", ["opt-proj", "llama-gqa"])
def test_soft_prompt_generation_equals_transformers(name, root):
    """BLIP-2's path: embeddings (not ids) as the prompt, left-padded."""
    ref, (ours, _) = reference(name), converted(name, root)
    ids, mask = prompts(ref.config.pad_token_id)
    embeds = ours.embed(ids).detach() + 0.05 * torch.randn(*ids.shape, ours.cfg.embed_dim)  # not any token's embedding
    with torch.no_grad():
        expect = ref.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, max_new_tokens=10,
                              eos_token_id=None, pad_token_id=ref.config.pad_token_id)
    got = generate(ours, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=10)
    assert torch.equal(got.tokens, expect)


def test_config_conversion_and_json_round_trip(root):
    _, d = converted("opt-350m-like", root)
    cfg = load_hf_lm(d).cfg
    assert (cfg.family, cfg.pre_norm, cfg.embed_proj_dim, cfg.act, cfg.tie_embeddings) == ("opt", False, 16, "relu", True)
    cfg = converted("qwen2", root)[0].cfg
    assert (cfg.qkv_bias, cfg.out_bias, cfg.kv_heads, cfg.norm) == (True, False, 1, "rms")
    cfg = converted("llama-tied-bias-hd", root)[0].cfg
    assert (cfg.qkv_bias, cfg.out_bias, cfg.head_size) == (True, True, 12)
    assert config_from_dict(cfg.to_dict()) == cfg
    multi = cfg.replace(eos_token_id=(2, 7))
    assert config_from_dict(multi.to_dict()).eos_ids == (2, 7)
    old = dict(LLAMA, model_type="llama", num_key_value_heads=2, rope_theta=1e6, hidden_act="silu")
    assert config_from_hf(old).rope_theta == 1e6
    with pytest.raises(CheckpointError, match="rope scaling 'llama3'"):
        config_from_hf(dict(old, rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    with pytest.raises(ConfigError, match="unknown family"):
        LMConfig(family="gpt2")


@pytest.mark.parametrize("damage", ["extra", "missing", "shape"])
def test_key_map_fails_loudly(damage, tmp_path):
    ref = reference("llama-gqa")
    ref.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    if damage == "extra":
        state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    elif damage == "missing":
        del state["model.layers.1.mlp.up_proj.weight"]
    else:
        state["model.norm.weight"] = torch.zeros(5)
    save_file(state, path)
    with pytest.raises(CheckpointError, match={"extra": "unused key", "missing": "missing key",
                                               "shape": "shape mismatch"}[damage]):
        load_hf_lm(tmp_path)


def test_loss_is_shifted_cross_entropy():
    torch.manual_seed(0)
    lm = DecoderLM(LMConfig(vocab_size=50, width=32, layers=1, heads=4, kv_heads=2, mlp_dim=48))
    ids = torch.randint(0, 50, (2, 7))
    targets = ids.clone()
    targets[0, :3] = -100  # e.g. soft-prompt or instruction positions
    out = lm(ids, targets=targets)
    logits = out.logits[:, :-1].reshape(-1, 50)
    manual = torch.nn.functional.cross_entropy(logits, targets[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    keep = targets[:, 1:] != -100
    by_hand = -logits.log_softmax(-1)[torch.arange(12), targets[:, 1:].reshape(-1).clamp(min=0)][keep.reshape(-1)]
    torch.testing.assert_close(out.loss, by_hand.mean())
    assert lm(ids).loss is None
