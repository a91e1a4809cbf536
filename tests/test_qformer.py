"""The Q-Former on its own: shapes, the three stage-1 masks (what queries and text may see of each
other), padding, SDPA against eager, and the stage-1 model's heads and losses."""

import pytest
import torch

from polymodal.config import Blip2Config, ConfigError, QFormerConfig, VisionConfig
from polymodal.models.blip2 import Blip2Stage1
from polymodal.models.qformer import QFormer, stage1_mask

Q, T, S, VW = 3, 5, 7, 12  # queries, text tokens, image tokens, image width
CFG = QFormerConfig(vocab_size=30, context_length=16, width=16, layers=3, heads=2, mlp_dim=24, num_query_tokens=Q,
                    cross_attention_frequency=2, dec_token_id=29)


@pytest.fixture(scope="module")
def qformer():
    torch.manual_seed(0)
    return QFormer(CFG, VW).eval()


def inputs(seed=0, B=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, VW, generator=g), torch.randint(1, 29, (B, T), generator=g)


def test_shapes_and_cross_attention_every_other_layer(qformer):
    image, ids = inputs()
    assert [layer.xattn is not None for layer in qformer.layers] == [True, False, True]
    out = qformer(image)
    assert out.queries.shape == (2, Q, 16) and out.text is None
    out = qformer(None, ids)
    assert out.queries is None and out.text.shape == (2, T, 16)
    out = qformer(image, ids, mask="itg")
    assert out.queries.shape == (2, Q, 16) and out.text.shape == (2, T, 16)
    assert qformer.text_logits(out.text).shape == (2, T, 30)
    with pytest.raises(ValueError, match="unknown Q-Former mask"):
        qformer(image, ids, mask="causal")
    with pytest.raises(ValueError, match="give an image"):
        qformer()


def test_mask_layout():
    m = stage1_mask("itg", 2, torch.tensor([[1, 1, 0]]))[0, 0].int()
    assert m.tolist() == [[1, 1, 0, 0, 0],  # queries see queries only
                          [1, 1, 0, 0, 0],
                          [1, 1, 1, 0, 0],  # text sees every query and the text up to itself
                          [1, 1, 1, 1, 0],
                          [1, 1, 1, 1, 1]]  # a padding row (never read) sees itself too
    itc = stage1_mask("itc", 2, torch.ones(1, 2))[0, 0].int()
    assert itc.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert stage1_mask("itm", 2, torch.tensor([[1, 0]]))[0, 0, :2].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]


@pytest.mark.parametrize("mask", ["itc", "itg"])
def test_queries_do_not_see_text_under_itc_and_itg(qformer, mask):
    image, ids = inputs()
    other = inputs(seed=1)[1]
    with torch.no_grad():
        a, b = qformer(image, ids, mask=mask), qformer(image, other, mask=mask)
        alone = qformer(image).queries
    torch.testing.assert_close(a.queries, b.queries, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.queries, alone, atol=1e-5, rtol=0)  # as if the text were not there


def test_itc_text_is_unimodal_and_itm_is_bidirectional(qformer):
    image, ids = inputs()
    with torch.no_grad():
        itc = qformer(image, ids, mask="itc").text
        torch.testing.assert_close(itc, qformer(None, ids).text, atol=1e-5, rtol=0)  # the text encoder alone
        torch.testing.assert_close(itc, qformer(image * 2 + 1, ids, mask="itc").text, atol=1e-6, rtol=0)
        a, b = qformer(image, ids, mask="itm"), qformer(image, inputs(seed=1)[1], mask="itm")
    assert (a.queries - b.queries).abs().max() > 1e-3  # under ITM the queries read the text
    assert (a.text - qformer(image * 2 + 1, ids, mask="itm").text).abs().max() > 1e-3  # and the text the image


def test_itg_text_is_causal_and_sees_the_image(qformer):
    image, ids = inputs()
    changed = ids.clone()
    changed[:, 3] = (ids[:, 3] % 28) + 1
    with torch.no_grad():
        a, b = qformer(image, ids, mask="itg").text, qformer(image, changed, mask="itg").text
        c = qformer(image * 2 + 1, ids, mask="itg").text
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=1e-6, rtol=0)  # earlier text never sees later text
    assert (a[:, 3:] - b[:, 3:]).abs().max() > 1e-3
    assert (a - c).abs().max() > 1e-3  # through the queries, the text reads the image


@pytest.mark.parametrize("mask", ["itc", "itm", "itg"])
def test_padding_is_never_read_and_sdpa_equals_eager(qformer, mask):
    image, ids = inputs()
    attention = torch.ones_like(ids)
    attention[1, 3:] = 0
    other = ids.clone()
    other[1, 3:] = 7
    with torch.no_grad():
        a = qformer(image, ids, attention, mask=mask)
        b = qformer(image, other, attention, mask=mask)
        e = qformer(image, ids, attention, mask=mask, eager=True)
    real = attention.bool()
    torch.testing.assert_close(a.queries, b.queries, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.text[real], b.text[real], atol=1e-6, rtol=0)
    torch.testing.assert_close(a.queries, e.queries, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.text[real], e.text[real], atol=1e-5, rtol=0)


def test_query_only_qformer_has_no_text_side():
    cfg = QFormerConfig(width=16, layers=2, heads=2, mlp_dim=24, num_query_tokens=Q, text_input=False, lm_head=False)
    model = QFormer(cfg, VW)
    assert model.token_embed is None and all(layer.text_mlp is None for layer in model.layers)
    assert model(inputs()[0]).queries.shape == (2, Q, 16)
    with pytest.raises(ValueError, match="no text side"):
        model(None, inputs()[1])
    with pytest.raises(ConfigError, match="needs the text side"):
        QFormerConfig(text_input=False, lm_head=True)
    with pytest.raises(ConfigError, match="cannot be split"):
        QFormerConfig(width=10, heads=3)


def test_stage1_heads_losses_and_gradients():
    torch.manual_seed(0)
    vision = VisionConfig(image_size=16, patch_size=8, width=VW, layers=1, heads=2, mlp_dim=16, act="gelu",
                          norm_eps=1e-6, pre_norm=False, patch_bias=True)
    model = Blip2Stage1(Blip2Config(vision=vision, qformer=CFG, lm=None, embed_dim=8))
    pixels = torch.randn(4, 3, 16, 16)
    ids = torch.randint(1, 29, (4, T))
    attention = torch.ones_like(ids)
    attention[2, 3:] = 0
    out = model(pixels, ids, attention)
    assert out.itc.shape == (4, 4) and out.itm.shape == (4, 2) and out.itg.shape == (4, T, 30)
    assert out.loss is None and out.itc.abs().max() <= 1 + 1e-6  # cosines
    targets = ids.masked_fill(attention == 0, -100)
    out = model(pixels, ids, attention, targets=targets, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.loss, out.itc_loss + out.itm_loss + out.itg_loss)
    out.loss.backward()
    assert model.qformer.query_tokens.grad.abs().sum() > 0 and model.logit_scale.grad is not None
    assert model.qformer.lm_head.dense.weight.grad.abs().sum() > 0 and model.itm_head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least 2 pairs"):
        model(pixels[:1], ids[:1], targets=targets[:1])
    with pytest.raises(ConfigError, match="text side"):
        Blip2Stage1(Blip2Config(vision=vision, lm=None))


def test_shared_image_keys_and_values_equal_the_gathered_images():
    """SharedImage: passes over rows of one batch of images, their keys and values projected once,
    give the outputs and gradients of passes over the gathered images themselves."""
    from polymodal.models.qformer import SharedImage

    torch.manual_seed(0)
    qformer = QFormer(CFG, VW)
    image, ids = inputs(3, B=4)
    rows = torch.tensor([2, 0, 0, 3, 1, 2])
    text = torch.randint(1, 29, (6, T))

    def run(shared: bool):
        qformer.zero_grad()
        if shared:
            s = SharedImage()
            a = qformer(image, shared=s).queries
            b = qformer(image, text, mask="itm", shared=s.select(rows)).queries
            assert len(s.memo) == 2  # the two cross-attention layers, projected once each
        else:
            a = qformer(image).queries
            b = qformer(image[rows], text, mask="itm").queries
        (a.square().sum() + b.sin().sum()).backward()
        return a.detach(), b.detach(), {n: p.grad.clone() for n, p in qformer.named_parameters() if p.grad is not None}

    a1, b1, g1 = run(False)
    a2, b2, g2 = run(True)
    assert (a1 - a2).abs().max() <= 1e-5 and (b1 - b2).abs().max() <= 1e-5
    assert g1.keys() == g2.keys() and all((g1[n] - g2[n]).abs().max() <= 1e-4 for n in g1)
