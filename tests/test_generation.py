"""Invariants of generation and of the decoder LM on tiny random models: the KV cache equals no
cache, SDPA equals eager, soft prompts equal ids, left padding changes no row, and the stop rules,
streaming and sampling options do what they say."""

from types import SimpleNamespace

import pytest
import torch

from polymodal.config import LMConfig
from polymodal.generation import GenerationConfig, _warp, generate, stream
from polymodal.models.lm import DecoderLM

V, P = 61, 8
FAMILIES = {
    "opt": LMConfig(family="opt", vocab_size=V, width=32, layers=2, heads=4, mlp_dim=48, act="relu", norm_eps=1e-5,
                    max_positions=64, tie_embeddings=True, qkv_bias=True, out_bias=True, mlp_bias=True,
                    embed_proj_dim=24),
    "llama": LMConfig(family="llama", vocab_size=V, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=40),
}


def tiny(family: str, seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    lm = DecoderLM(FAMILIES[family]).eval()
    with torch.no_grad():
        lm.token_embed.weight.mul_(25)  # embeddings of std 0.5: confident, far-from-tied logits
    return lm


def batch(lengths=(P, 5, 1), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (len(lengths), P), generator=g)
    mask = (torch.arange(P) >= P - torch.tensor(lengths)[:, None]).long()  # left padding
    return ids.masked_fill(mask == 0, 0), mask


SAMPLING = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=7)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kv_cache_equals_no_cache(family):
    lm = tiny(family)
    ids, mask = batch()
    for opts in (dict(), SAMPLING, dict(num_beams=3, eos_token_id=5), dict(repetition_penalty=1.5)):
        cached = generate(lm, ids, attention_mask=mask, max_new_tokens=12, **opts)
        uncached = generate(lm, ids, attention_mask=mask, max_new_tokens=12, use_cache=False, **opts)
        assert torch.equal(cached.tokens, uncached.tokens), opts
    embeds = lm.embed(ids).detach()
    cached = generate(lm, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12, **SAMPLING)
    uncached = generate(lm, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12, use_cache=False,
                        **SAMPLING)
    assert torch.equal(cached.tokens, uncached.tokens)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_with_cache_equals_full_pass_and_eager(family):
    lm = tiny(family)
    ids, mask = batch()
    with torch.no_grad():
        full = lm(ids, attention_mask=mask).logits
        torch.testing.assert_close(lm(ids, attention_mask=mask, eager=True).logits, full, atol=1e-5, rtol=0)
        for eager in (False, True):
            cache = lm.new_cache(3, P)
            head = lm(ids[:, :5], attention_mask=mask[:, :5], cache=cache, eager=eager).logits
            tail = [lm(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, eager=eager).logits
                    for t in range(5, P)]
            chunked = torch.cat([head, *tail], 1)
            real = mask.bool()
            assert (chunked - full)[real].abs().max() < 1e-5
            assert cache.length() == P


@pytest.mark.parametrize("family", list(FAMILIES))
def test_inputs_embeds_equal_ids(family):
    lm = tiny(family)
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(lm(inputs_embeds=lm.embed(ids), attention_mask=mask).logits,
                                   lm(ids, attention_mask=mask).logits)
    by_ids = generate(lm, ids, attention_mask=mask, max_new_tokens=10)
    by_embeds = generate(lm, inputs_embeds=lm.embed(ids).detach(), attention_mask=mask, max_new_tokens=10)
    assert torch.equal(by_ids.tokens, by_embeds.tokens)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_left_padding_changes_no_row(family):
    lm = tiny(family)
    lengths = (P, 5, 1)
    ids, mask = batch(lengths)
    together = generate(lm, ids, attention_mask=mask, max_new_tokens=10).tokens
    for i, L in enumerate(lengths):
        alone = generate(lm, ids[i:i + 1, P - L:], max_new_tokens=10).tokens
        assert torch.equal(alone[0], together[i])


def test_greedy_is_argmax_of_the_forward():
    lm = tiny("llama")
    ids, _ = batch(lengths=(P,))
    out = generate(lm, ids, max_new_tokens=6).tokens
    seq = ids
    for _ in range(6):
        seq = torch.cat([seq, lm(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq[:, P:])


def test_top_k_1_and_tiny_top_p_sampling_equal_greedy():
    lm = tiny("opt")
    ids, mask = batch()
    greedy = generate(lm, ids, attention_mask=mask, max_new_tokens=12).tokens
    for opts in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, temperature=5.0)):
        sampled = generate(lm, ids, attention_mask=mask, max_new_tokens=12, do_sample=True, seed=3, **opts)
        assert torch.equal(sampled.tokens, greedy), opts


def test_sampling_is_seeded():
    lm = tiny("llama")
    ids, mask = batch()
    a = generate(lm, ids, attention_mask=mask, max_new_tokens=16, do_sample=True, seed=1).tokens
    b = generate(lm, ids, attention_mask=mask, max_new_tokens=16, do_sample=True, seed=1).tokens
    c = generate(lm, ids, attention_mask=mask, max_new_tokens=16, do_sample=True,
                 generator=torch.Generator().manual_seed(2)).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_warpers_equal_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = torch.randn(4, 50) * 3
    for t, k, p in [(0.7, 10, 0.8), (1.3, 0, 0.5), (1.0, 3, 1.0), (0.5, 0, 0.95)]:
        ref = TemperatureLogitsWarper(t)(None, scores.clone())
        ref = TopKLogitsWarper(k)(None, ref) if k else ref
        ref = TopPLogitsWarper(p)(None, ref) if p < 1 else ref
        ours = _warp(scores.clone(), GenerationConfig(temperature=t, top_k=k, top_p=p))
        assert torch.equal(ours.isinf(), ref.isinf()) and torch.allclose(ours[~ours.isinf()], ref[~ref.isinf()])
    assert transformers  # the reference was importable


def test_eos_stops_and_min_new_tokens_suppresses_it():
    lm = tiny("llama")
    ids, mask = batch(lengths=(P,))
    free = generate(lm, ids, max_new_tokens=10).tokens[0]
    eos = int(free[0])
    stopped = generate(lm, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=60)
    assert stopped.tokens.tolist() == [[eos]] and stopped.lengths.tolist() == [1]
    late = generate(lm, ids, max_new_tokens=10, eos_token_id=(59, eos), min_new_tokens=4)
    assert late.lengths.item() >= 4
    assert eos not in late.tokens[0, :4].tolist()


def test_finished_rows_are_padded():
    lm = tiny("opt")
    ids, mask = batch()
    free = generate(lm, ids, attention_mask=mask, max_new_tokens=10).tokens
    eos = int(free[1, 2])
    out = generate(lm, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=60)
    for row, n in zip(out.tokens.tolist(), out.lengths.tolist(), strict=True):
        assert all(t == 60 for t in row[n:])
        assert n == len(row) or row[n - 1] == eos
    assert out.lengths[1] <= 3


def decode(ids: list[int]) -> str:
    return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_stop():
    lm = tiny("llama")
    ids, mask = batch()
    free = generate(lm, ids, attention_mask=mask, max_new_tokens=16).tokens
    text = decode(free[0].tolist())
    stop = text[6:9]
    first = next(n for n in range(1, 17) if stop in text[:n])  # the token that completes it
    out = generate(lm, ids, attention_mask=mask, max_new_tokens=16, stop_strings=stop, decode=decode, pad_token_id=0)
    assert out.lengths[0] == first
    assert torch.equal(out.tokens[0, :first], free[0, :first])
    with pytest.raises(ValueError, match="decode"):
        generate(lm, ids, attention_mask=mask, stop_strings=("x",))


def test_streaming_yields_the_same_tokens():
    lm = tiny("opt")
    ids, mask = batch()
    for opts in (dict(), SAMPLING):
        final = generate(lm, ids, attention_mask=mask, max_new_tokens=9, **opts).tokens
        streamed = torch.stack(list(stream(lm, ids, attention_mask=mask, max_new_tokens=9, **opts)), 1)
        seen = []
        by_callback = generate(lm, ids, attention_mask=mask, max_new_tokens=9, on_token=seen.append, **opts)
        assert torch.equal(streamed, final) and torch.equal(torch.stack(seen, 1), by_callback.tokens)
    with pytest.raises(ValueError, match="stream"):
        next(stream(lm, ids, attention_mask=mask, num_beams=2))


def test_bad_inputs_give_clear_errors():
    lm = tiny("opt")
    ids, mask = batch()
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(lm, ids, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="exactly one"):
        generate(lm, ids, inputs_embeds=lm.embed(ids))
    with pytest.raises(ValueError, match="top_p"):
        generate(lm, ids, attention_mask=mask, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="exceed"):
        lm(torch.zeros(1, 65, dtype=torch.long))


class Counter(torch.nn.Module):
    """Not an LM at all: predicts (last token + 1) mod 10. Generation needs only this contract."""

    def forward(self, ids=None, *, inputs_embeds=None, attention_mask=None, cache=None):
        logits = torch.nn.functional.one_hot((ids + 1) % 10, 10).float() * 5  # (B, T, 10)
        return SimpleNamespace(logits=logits)

    def new_cache(self, batch, max_len):
        return SimpleNamespace(reorder=lambda index: None)


def test_any_model_with_the_contract_generates():
    ids = torch.tensor([[3], [8]])
    assert generate(Counter(), ids, max_new_tokens=4).tokens.tolist() == [[4, 5, 6, 7], [9, 0, 1, 2]]
    out = generate(Counter(), ids, max_new_tokens=4, num_beams=2, eos_token_id=0)
    assert out.tokens.tolist() == [[4, 5, 6, 7], [9, 0, 0, 0]] and out.lengths.tolist() == [4, 2]
