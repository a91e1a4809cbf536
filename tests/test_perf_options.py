"""The speed options keep the answers: length-sorted text batches equal one text at a time
(in input order), int8 and bf16 embeddings stay within cosine 0.99 of fp32, `embed --int8`
works end to end. Speed itself is measured in bench/, never here."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import polymodal
from polymodal.checkpoints.pretrained import save_pretrained
from polymodal.cli import app
from polymodal.config import CLIPConfig, ImageTransformConfig, TextConfig, VisionConfig
from polymodal.models.clip import CLIP
from polymodal.nn.quant import is_quantized, quantize_int8
from polymodal.processing.tokenizer import clip_tokenizer
from polymodal.tasks.embed import _token_budget_ends

TEXTS = ["a cat", "a photo of a small red bicycle leaning against a wall in the rain at night", "dog",
         "two people walking on a beach", "a bowl of soup", "an aerial view of a city with many tall buildings "
         "and a river running through it under a cloudy sky, seen from a plane", "ok", "a green apple on a table"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = CLIPConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=256),
        text=TextConfig(width=64, layers=2, heads=4, mlp_dim=256),
        embed_dim=32,
        image_transform=ImageTransformConfig(size=32, resize=32),
    )
    return save_pretrained(CLIP(cfg), tmp_path_factory.mktemp("perf") / "clip", clip_tokenizer())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(6):
        a = np.linspace(rng.integers(0, 255, 3), rng.integers(0, 255, 3), 48)[None].repeat(40, 0)
        a = a + rng.normal(0, 20, a.shape)
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    return paths


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_length_sorted_text_batches_equal_one_at_a_time_in_input_order(model_dir):
    embedder = polymodal.load(model_dir, device="cpu", batch_size=1)  # budget: 77 padded positions a batch
    lengths = [len(ids) for ids in embedder.tokenizer.encode_batch(TEXTS)]
    assert len(set(lengths)) > 4 and lengths != sorted(lengths)  # mixed lengths, not already sorted
    ends = _token_budget_ends(sorted(lengths), 77)
    assert 2 <= len(ends) < len(TEXTS) and ends[-1] == len(TEXTS)  # several batches, some of several texts
    batched = embedder.encode_text(TEXTS)
    alone = np.concatenate([embedder.encode_text([t]) for t in TEXTS])  # no padding at all
    np.testing.assert_allclose(batched, alone, atol=1e-6)
    # the same texts padded to the context length in one batch (what a padding reference does)
    tok = embedder.tokenizer
    ids = torch.full((len(TEXTS), tok.context_length), tok.pad_id, dtype=torch.long)
    for r, row in enumerate(tok.encode_batch(TEXTS)):
        ids[r, :len(row)] = torch.tensor(row)
    with torch.inference_mode():
        padded = embedder.model.text_features(ids, (ids != tok.pad_id).long()).numpy()
    np.testing.assert_allclose(batched, padded, atol=1e-5)
    # order restored: a permuted input gives the permuted rows
    perm = [5, 2, 7, 0, 3, 1, 6, 4]
    np.testing.assert_allclose(embedder.encode_text([TEXTS[i] for i in perm]), batched[perm], atol=1e-6)


def test_token_budget_batches():
    assert _token_budget_ends([], 10) == []
    assert _token_budget_ends([3, 3, 3, 4, 5, 9, 20], 10) == [3, 5, 6, 7]  # 3x3, 2x5, 1x9, 1x20 (over, alone)
    assert _token_budget_ends([2] * 6, 12) == [6]


def test_int8_embeddings_stay_within_cosine_099_of_fp32(model_dir, images):
    fp32 = polymodal.load(model_dir, device="cpu")
    int8 = polymodal.load(model_dir, device="cpu", int8=True)
    assert is_quantized(int8.model) and not is_quantized(fp32.model)
    img = cosines(int8.encode_image(images), fp32.encode_image(images))
    txt = cosines(int8.encode_text(TEXTS), fp32.encode_text(TEXTS))
    assert img.min() >= 0.99 and txt.min() >= 0.99, (img, txt)
    assert not np.allclose(int8.encode_image(images), fp32.encode_image(images), atol=1e-6)  # really int8
    with pytest.raises(ValueError, match="CPU only"):
        polymodal.load(model_dir, device="cuda", int8=True)


def test_quantize_int8_copies_unless_inplace():
    lin = torch.nn.Sequential(torch.nn.Linear(16, 16))
    q = quantize_int8(lin)
    assert is_quantized(q) and not is_quantized(lin)
    x = torch.randn(4, 16)
    assert torch.nn.functional.cosine_similarity(q(x), lin(x)).min() > 0.99


def test_bf16_autocast_embeddings_close_to_fp32(model_dir, images):
    fp32 = polymodal.load(model_dir, device="cpu")
    assert not fp32.bf16  # off by default on the CPU
    bf16 = polymodal.load(model_dir, device="cpu", bf16=True)
    assert cosines(bf16.encode_image(images), fp32.encode_image(images)).min() >= 0.99
    assert cosines(bf16.encode_text(TEXTS), fp32.encode_text(TEXTS)).min() >= 0.99


def test_cli_embed_int8(tmp_path, model_dir, images):
    out = tmp_path / "int8.npy"
    args = [a for p in images for a in ("--image", p)]
    result = CliRunner().invoke(app, ["embed", "-m", str(model_dir), *args, "--int8", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shape"] == [len(images), 32]
    vectors = np.load(out)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    reference = polymodal.load(model_dir, device="cpu").encode_image(images)
    assert cosines(vectors, reference).min() >= 0.99


def test_vit_last_block_for_the_class_token_only_equals_the_full_block():
    from polymodal.nn import Attention, Block

    torch.manual_seed(0)
    model = CLIP(CLIPConfig(vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=3, heads=4, mlp_dim=128),
                            text=TextConfig(width=32, layers=1, heads=2, mlp_dim=64), embed_dim=16)).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = model.visual(pixels)
        lean = model.visual(pixels, pooled_only=True)
        assert lean.tokens.shape == (3, 1, 64) and full.tokens.shape == (3, 17, 64)
        torch.testing.assert_close(lean.pooled, full.pooled, atol=1e-5, rtol=0)
        torch.testing.assert_close(lean.tokens[:, 0], full.tokens[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.visual(pixels, pooled_only=True, eager=True).pooled, full.pooled,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(model.image_features(pixels), torch.nn.functional.normalize(
            model.visual_proj(full.pooled), dim=-1), atol=1e-5, rtol=0)
        # keep with a padding mask (BERT-style (B, 1, 1, S) and per-query (B, 1, T, S))
        block, x = Block(64, 4, 128), torch.randn(2, 5, 64)
        for mask in (torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()[:, None, None, :],
                     torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()):
            torch.testing.assert_close(block(x, mask=mask, keep=2), block(x, mask=mask)[:, :2], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="keep"):
        Attention(64, 4)(torch.randn(1, 4, 64), causal=True, keep=1)
