"""The ViT from its parts: patches, their projection, the class token, positions."""

import pytest
import torch

from polymodal.config import CLIPConfig, TextConfig, VisionConfig
from polymodal.models.clip import CLIP
from polymodal.models.vit import PatchEmbed, VisionTransformer, patchify

torch.manual_seed(0)
TINY = VisionConfig(image_size=32, patch_size=8, width=48, layers=2, heads=4, mlp_dim=96)


def test_strided_conv_equals_flatten_and_project():
    """The seed description: flatten each P x P patch to a C*P*P vector, multiply by E."""
    embed = PatchEmbed(patch_size=8, channels=3, width=48, bias=True)
    pixels = torch.randn(2, 3, 32, 40)
    flat = patchify(pixels, 8)  # (B, N, C*P*P)
    assert flat.shape == (2, 4 * 5, 3 * 8 * 8)
    E = embed.proj.weight.reshape(48, -1)  # (D, C*P*P): the conv kernel is the projection matrix
    explicit = flat @ E.T + embed.proj.bias
    torch.testing.assert_close(embed(pixels), explicit, atol=1e-5, rtol=0)


def test_patchify_order_is_row_major():
    pixels = torch.arange(1 * 1 * 4 * 4, dtype=torch.float32).reshape(1, 1, 4, 4)
    patches = patchify(pixels, 2)
    assert patches[0, 0].tolist() == [0, 1, 4, 5]  # top-left
    assert patches[0, 1].tolist() == [2, 3, 6, 7]  # top-right comes second
    assert patches[0, 2].tolist() == [8, 9, 12, 13]


def test_vit_shapes_and_tokens():
    vit = VisionTransformer(TINY).eval()
    out = vit(torch.randn(3, 3, 32, 32))
    assert out.pooled.shape == (3, 48)
    assert out.tokens.shape == (3, 1 + 16, 48)
    torch.testing.assert_close(out.pooled, vit.norm_post(out.tokens[:, 0]))


def test_vit_sdpa_equals_eager():
    vit = VisionTransformer(TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit(x).tokens, vit(x, eager=True).tokens, atol=1e-5, rtol=0)


def test_position_interpolation():
    vit = VisionTransformer(TINY).eval()
    assert vit.position_embeddings(4, 4) is vit.pos_embed  # native resolution: unchanged
    bigger = vit.position_embeddings(6, 8)
    assert bigger.shape == (1 + 48, 48)
    torch.testing.assert_close(bigger[0], vit.pos_embed[0])  # the class position is kept
    # interpolating a constant field gives the same constant
    with torch.no_grad():
        vit.pos_embed[1:] = 0.5
    torch.testing.assert_close(vit.position_embeddings(7, 5)[1:], torch.full((35, 48), 0.5), atol=1e-5, rtol=0)
    assert vit(torch.randn(1, 3, 48, 64)).tokens.shape == (1, 1 + 48, 48)


def test_vit_refuses_sizes_that_are_not_patch_multiples():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        VisionTransformer(TINY)(torch.randn(1, 3, 30, 32))


def test_clip_forward_and_loss():
    cfg = CLIPConfig(vision=TINY, text=TextConfig(vocab_size=64, context_length=12, width=32, layers=1,
                                                  heads=2, mlp_dim=64, eot_token_id=63), embed_dim=16)
    model = CLIP(cfg)
    ids = torch.randint(1, 60, (4, 12))
    ids[:, -1] = 63
    out = model(torch.randn(4, 3, 32, 32), ids, targets=torch.arange(4))
    assert out.image_embeds.shape == out.text_embeds.shape == (4, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(4))
    assert out.logits_per_text.shape == (4, 4)
    assert out.loss is not None and out.loss.item() > 0
    out.loss.backward()
    assert model.logit_scale.grad is not None
