"""Tiles (Blip2Config.tiles, models/blip2.py): the frozen ViT also reads enlarged overlapping crops, so a
small object covers more patches. The crops are where they should be and enlarged; the tiles' tokens
are the tower's own, pooled as asked, each view told apart by a learned embedding that trains; a tiled
recipe trains, saves, reloads and answers the same; its cached features are not an untiled run's."""

import json

import pytest
import torch
import torch.nn.functional as F
from tests.test_vlm_recipe import parts, recipe  # noqa: F401  (parts: a fixture)

from polymodal.checkpoints.vlm_io import load_vlm_checkpoint
from polymodal.config import Blip2Config, ConfigError, QFormerConfig, preset
from polymodal.models.blip2 import Blip2Stage1, ViewEmbedding, image_features, tile_views
from polymodal.models.vit import VisionTransformer
from polymodal.tasks.vlm import VLM
from polymodal.train.vlm import StageConfig, build_models, cached_features, load_examples, train_vlm

VISION = preset("tiny").vision.replace(image_size=32, patch_size=8)  # a 4 x 4 patch grid


def test_tiles_are_enlarged_crops_on_an_even_grid():
    pixels = torch.randn(2, 3, 16, 16)
    views = tile_views(pixels, 3)  # corners at 0, 4, 8: they overlap
    assert views.shape == (2, 9, 3, 16, 16)
    crop = pixels[:, :, 4:12, 8:16]  # row 1, column 2
    assert torch.equal(views[:, 5], F.interpolate(crop, size=(16, 16), mode="bicubic", align_corners=False))
    # a small square in the top-left corner fills four times the pixels in the first tile, none in the last
    picture = torch.zeros(1, 3, 16, 16)
    picture[:, 0, 1:3, 1:3] = 1.0
    tiles = tile_views(picture, 2)[0, :, 0]  # (4, 16, 16): the red channel of each tile
    assert (picture[0, 0] > 0.5).sum() == 4 and (tiles[0] > 0.5).sum() == 16
    assert (tiles[3].abs() < 1e-6).all() and (tiles[1].abs() < 1e-6).all()


def test_tile_features_are_the_towers_own_tokens_pooled():
    torch.manual_seed(0)
    visual = VisionTransformer(VISION).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole = image_features(visual, pixels)
        tiled = image_features(visual, pixels, tiles=2)
        pooled = image_features(visual, pixels, tiles=2, tile_pool=2)
        tile = visual.norm_post(visual(tile_views(pixels, 2)[:, 1]).tokens)[:, 1:]  # (2, 16, width): tile 1
    assert torch.equal(tiled[:, :17], whole) and tiled.shape[1] == 17 + 4 * 16
    assert (tiled[:, 17 + 16:17 + 32] - tile).abs().max() <= 1e-5
    grid = tile.view(2, 4, 4, -1)  # its top-left 2 x 2 block, averaged: the first pooled token of tile 1
    assert pooled.shape[1] == 17 + 4 * 4
    assert (pooled[:, 17 + 4] - grid[:, :2, :2].mean(dim=(1, 2))).abs().max() <= 1e-5


def test_views_are_told_apart_and_learn():
    torch.manual_seed(0)
    qcfg = QFormerConfig(vocab_size=50, width=32, layers=2, heads=4, mlp_dim=64, num_query_tokens=4,
                         context_length=8, dec_token_id=49)
    cfg = Blip2Config(vision=VISION, qformer=qcfg, lm=None, embed_dim=16, tiles=2, tile_pool=2)
    model = Blip2Stage1(cfg)
    assert model.views.view.tolist() == [0] * 17 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    pixels, ids = torch.randn(4, 3, 32, 32), torch.randint(1, 49, (4, 8))
    features = image_features(model.visual, pixels, tiles=2, tile_pool=2)
    out = model(None, ids, features=features, targets=ids)
    assert torch.allclose(out.itc, model(pixels, ids).itc, atol=1e-6)  # cached features = pixels
    out.loss.backward()
    grad = model.views.weight.grad
    assert grad is not None and (grad.abs().sum(dim=1) > 0).all()  # every view moves the loss
    with pytest.raises(ValueError, match="tokens"):
        model(None, ids, features=features[:, :20])
    with pytest.raises(ConfigError, match="tiling"):
        ViewEmbedding(cfg.replace(tile_pool=3))


def test_a_tiled_recipe_trains_saves_and_answers_the_same(parts, tmp_path):  # noqa: F811
    tiled = recipe(parts, tiles=2, tile_pool=2, stage1=StageConfig(steps=20, batch_size=16, lr=2e-3, warmup=5),
                   stage2=StageConfig(steps=60, batch_size=8, lr=3e-3, warmup=5))
    out = train_vlm(tiled, parts / "colours", tmp_path / "vlm")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["stage"] == "stage2"]
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5]), (losses[:5], losses[-5:])
    model, tok, template, _ = load_vlm_checkpoint(out)
    assert model.cfg.tiles == 2 and model.cfg.tile_pool == 2 and model.views.weight.abs().sum() > 0
    image = parts / "colours" / "images" / "red0.png"
    with torch.no_grad():
        assert model.visual_prompt(VLM(model, tok, template).pixels(image)).shape[1] == 4
    # the saved model answers as the trained one did, and an untiled run's features are not reused
    again = VLM(*load_vlm_checkpoint(out))
    assert again.ask(image, "What is this?", max_new_tokens=3) == VLM(model, tok, template).ask(
        image, "What is this?", max_new_tokens=3)
    paths = [ex["image"] for ex in load_examples(parts / "colours")]
    plain, *_ = build_models(recipe(parts))
    features, _ = cached_features(out / "features.safetensors", plain, "clip", paths)
    assert features.shape[1] == 17  # recomputed for the untiled model, not the tiled run's 33 tokens
