"""Object-level alignment on generated scenes (train/regions.py): the phrases, the pooling around an
object, batches that are a pure function of the step, and a tiny CLIP whose patch tokens learn to name
the objects drawn under them."""

import numpy as np
import pytest
import torch
from tests.conftest import read_metrics

import polymodal
from polymodal.config import (
    CLIPConfig,
    ImageTransformConfig,
    TextConfig,
    VisionConfig,
    load_config,
    save_config,
)
from polymodal.data.scenes import build_scenes
from polymodal.models.clip import CLIP
from polymodal.processing.tokenizer import clip_tokenizer
from polymodal.train.config import TrainConfig
from polymodal.train.regions import PHRASES, RegionBatches, phrase_of, pooling_weights, region_terms
from polymodal.train.trainer import train


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    build_scenes(root / "data", n=240, seed=3, size=32)
    model = CLIPConfig(vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=128),
                       text=TextConfig(context_length=16, width=64, layers=2, heads=4, mlp_dim=128),
                       embed_dim=64, image_transform=ImageTransformConfig(size=32, resize=32))
    save_config(model, root / "model.json")
    return root


def test_phrases_and_pooling_weights():
    assert len(PHRASES) == len(set(PHRASES)) == 64
    assert PHRASES[phrase_of({"size": "small", "colour": "red", "shape": "square"})] == "a small red square"
    where = torch.tensor([[0, 0.1, 0.1, 0.085], [0, 0.8, 0.3, 0.085], [0, 0.8, 0.3, 0.16]])
    w = pooling_weights(where, grid=8)  # (3, 64), row-major patches
    assert torch.allclose(w.sum(1), torch.ones(3))
    assert w[0].argmax() == 0 and w[1].argmax() == 2 * 8 + 6  # x 0.8 -> column 6, y 0.3 -> row 2
    assert w[1].max() > w[2].max()  # a small object is pooled from fewer patches than a large one


def test_batches_are_a_function_of_the_step(scenes):
    cfg = load_config(scenes / "model.json")
    batches = RegionBatches(scenes / "data", cfg.image_transform, batch_size=8, seed=0)
    a, b, c = batches.batch(5), batches.batch(5), batches.batch(6)
    assert torch.equal(a.pixels, b.pixels) and torch.equal(a.labels, b.labels) and torch.equal(a.where, b.where)
    assert not torch.equal(a.pixels, c.pixels)
    assert a.pixels.shape == (8, 3, 32, 32) and len(a.where) == len(a.labels) >= 8  # every scene has an object
    assert set(a.where[:, 0].long().tolist()) == set(range(8))
    assert RegionBatches(scenes / "data", cfg.image_transform, batch_size=8, split="test").rows  # held out
    with pytest.raises(ValueError, match="no rows with `objects`"):
        RegionBatches(scenes / "data", cfg.image_transform, batch_size=8, split="nope")


def _held_out_accuracy(model, scenes) -> float:
    batch = RegionBatches(scenes / "data", model.cfg.image_transform, batch_size=24, split="test").batch(0)
    tok = clip_tokenizer(context_length=16)(list(PHRASES))
    with torch.no_grad():
        phrases = model.text_features(tok["input_ids"], tok["attention_mask"])
        return region_terms(model, batch, phrases)["region_acc"].item()


def test_a_tiny_clip_learns_to_name_the_object_under_its_patches(scenes, tmp_path):
    cfg = TrainConfig(model=str(scenes / "model.json"), data=str(scenes / "data"), batch_size=16, steps=80, lr=2e-3,
                      warmup=5, weight_decay=0.05, save_every=40, log_every=10, seed=0, augment=False,
                      regions=str(scenes / "data"), region_batch=16)
    with pytest.raises(ValueError, match="accum"):
        cfg.replace(accum=2)
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    rows = read_metrics(run)
    assert "region_loss" in rows[0] and rows[-1]["region_loss"] < rows[0]["region_loss"] - 0.5, rows
    before = _held_out_accuracy(CLIP(load_config(scenes / "model.json")).eval(), scenes)
    after = _held_out_accuracy(polymodal.load(run).model.eval(), scenes)
    assert after > max(0.2, before + 0.1), (before, after)  # 64 phrases: chance 1/64
    assert np.isfinite(rows[-1]["loss"])
