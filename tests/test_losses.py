"""ClipLoss against a hand-written InfoNCE, the temperature clamp, and GradCache accumulation
equal to one big batch."""

import math

import pytest
import torch

from polymodal.config import CLIPConfig, TextConfig, VisionConfig
from polymodal.models.clip import CLIP
from polymodal.train import ClipLoss, accumulated_backward, clamp_logit_scale_, total_loss

EOT = 63
TINY = CLIPConfig(
    vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64),
    text=TextConfig(vocab_size=64, context_length=16, width=32, layers=1, heads=2, mlp_dim=64,
                    bos_token_id=62, eot_token_id=EOT, pad_token_id=EOT),
    embed_dim=16,
)


def make_batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 32, 32, generator=g)
    ids = torch.randint(0, 62, (n, 16), generator=g)
    lengths = torch.randint(2, 15, (n,), generator=g)  # end-of-text position of each row
    positions = torch.arange(16)
    ids[positions >= lengths[:, None]] = EOT
    mask = (positions <= lengths[:, None]).long()
    return pixels, ids, mask


def reference_loss(img, txt, logit_scale) -> float:
    """CLIP's Figure 1, one exponential at a time, in float64."""
    img, txt, scale = img.double(), txt.double(), math.exp(float(logit_scale))
    n = img.shape[0]
    logits = [[scale * float(img[i] @ txt[j]) for j in range(n)] for i in range(n)]
    per_image = -sum(logits[i][i] - math.log(sum(math.exp(logits[i][j]) for j in range(n))) for i in range(n)) / n
    per_text = -sum(logits[j][j] - math.log(sum(math.exp(logits[i][j]) for i in range(n))) for j in range(n)) / n
    return (per_image + per_text) / 2


def test_loss_equals_hand_written_infonce():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    logit_scale = torch.tensor(math.log(1 / 0.07))
    terms = ClipLoss()(img, txt, logit_scale)
    assert set(terms) == {"contrastive_loss", "logit_scale"}
    assert abs(terms["contrastive_loss"].item() - reference_loss(img, txt, logit_scale)) < 1e-5
    assert terms["logit_scale"].item() == pytest.approx(1 / 0.07)
    assert not terms["logit_scale"].requires_grad
    assert total_loss(terms).item() == terms["contrastive_loss"].item()


def test_aligned_features_give_near_zero_loss():
    img = torch.eye(5, 8)  # orthonormal rows: the diagonal is 1, everything else 0
    terms = ClipLoss()(img, img.clone(), torch.tensor(math.log(100)))
    assert terms["contrastive_loss"].item() < 1e-6


def test_logit_scale_gets_a_gradient():
    torch.manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.1 * torch.randn(4, 8), dim=-1)
    logit_scale = torch.nn.Parameter(torch.tensor(1.0))
    ClipLoss()(img, txt, logit_scale)["contrastive_loss"].backward()
    assert logit_scale.grad is not None and logit_scale.grad.item() < 0  # matched pairs: sharpen


def test_clamp_logit_scale():
    model = CLIP(TINY)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    clamp_logit_scale_(model)
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    clamp_logit_scale_(model)
    assert model.logit_scale.item() == 0.0
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    clamp_logit_scale_(model)
    assert model.logit_scale.item() == 3.0


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("k", [1, 2, 4])
def test_accumulation_equals_one_big_batch(k):
    """GradCache is exact: in float64 the gradients agree to ~1e-14. (In float32 the other
    order of summation alone moves gradients of size ~14 by a few ulp, ~4e-6.)"""
    torch.manual_seed(0)
    model = CLIP(TINY).double()
    pixels, ids, mask = make_batch(8)
    pixels = pixels.double()
    loss_fn = ClipLoss()

    big = total_loss(loss_fn(model.image_features(pixels), model.text_features(ids, mask), model.logit_scale))
    big.backward()
    expected = grads(model)
    model.zero_grad()

    terms = accumulated_backward(model, loss_fn, pixels.chunk(k), ids.chunk(k), mask.chunk(k))
    got = grads(model)
    assert abs(terms["contrastive_loss"].item() - big.item()) < 1e-12
    diff = max((got[n] - expected[n]).abs().max().item() for n in expected)
    assert diff <= 1e-6, f"k={k}: max abs gradient difference {diff:.3g}"
    assert all(expected[n].abs().max() > 0 for n in ("visual_proj.weight", "text_proj.weight", "logit_scale"))
