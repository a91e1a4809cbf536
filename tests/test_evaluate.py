"""Zero-shot accuracy and retrieval recall, on embeddings whose answers are known."""

import numpy as np
import pytest

from polymodal.tasks.evaluate import (
    class_embeddings,
    class_scores,
    member_votes,
    recall_at_k,
    recall_by_text,
    zero_shot,
)
from polymodal.train.config import TrainConfig
from polymodal.train.trainer import lr_at


def test_recall_at_k_by_hand():
    img = np.eye(4, dtype=np.float32)  # 4 images along the axes
    txt = np.array([[1, 0, 0, 0], [0, 0.9, 0.5, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float32)
    # texts 0..3 belong to images 0, 2, 1, 3: text 1 points more at image 1 than image 2
    r = recall_at_k(img, txt, [0, 2, 1, 3], ks=(1, 2))
    assert r["text_to_image_R@1"] == 0.75 and r["text_to_image_R@2"] == 1.0
    # image 2's only caption is text 1, and image 2's similarities [0, .5, 0, 0] rank it first
    assert r["image_to_text_R@1"] == 1.0


def test_recall_by_text_counts_any_right_image():
    img = np.eye(4, dtype=np.float32)
    # query 0 names images 0 and 1 and points at image 1; query 1 names image 3 and points at image 2 first
    txt = np.array([[0, 1, 0, 0], [0, 0, 1, 0.5]], dtype=np.float32)
    r = recall_by_text(img, txt, [{0, 1}, {3}], ks=(1, 2))
    assert r == {"text_to_image_R@1": 0.5, "text_to_image_R@2": 1.0}
    # scored per (image, query) pair, the same query misses its image 0 at k=1
    assert recall_at_k(img, txt[[0, 0, 1]], [0, 1, 3], ks=(1,))["text_to_image_R@1"] == 1 / 3


def test_recall_perfect_and_random():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert recall_at_k(x, x, range(50))["text_to_image_R@1"] == 1.0
    y = rng.normal(size=(50, 16)).astype(np.float32)
    assert recall_at_k(x, y, range(50))["text_to_image_R@1"] < 0.2


class FakeEmbedder:
    """Texts embed by which class word they contain; enough to check the bookkeeping."""

    classes = ["cat", "dog", "car"]

    def encode_text(self, texts):
        out = np.zeros((len(texts), len(self.classes)), np.float32)
        for i, t in enumerate(texts):
            out[i, [c in t for c in self.classes].index(True)] = 1
        return out


def test_zero_shot_accuracy_and_confusion():
    e = FakeEmbedder()
    np.testing.assert_allclose(class_embeddings(e, e.classes), np.eye(3), atol=1e-6)
    images = np.array([[1, 0, 0], [0, 1, 0], [0.2, 0.1, 0.9], [0, 0.8, 0.1]], np.float32)
    res = zero_shot(e, images, ["cat", "dog", "car", "cat"], classes=e.classes)
    assert res.accuracy == 0.75 and res.per_class == {"cat": 0.5, "dog": 1.0, "car": 1.0}
    assert res.confusion.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert res.predictions == ["cat", "dog", "car", "dog"]
    with pytest.raises(ValueError, match="not among the classes"):
        zero_shot(e, images, ["cat", "dog", "car", "bird"], classes=e.classes)


class WordEmbedder(FakeEmbedder):
    classes = ["animal", "vehicle", "cat", "car"]


def test_a_class_is_found_through_its_subclasses_names():
    e = WordEmbedder()
    # near "cat" and a little towards "vehicle", near "car" and a little towards "animal": the
    # broad names alone get both wrong
    images = np.array([[0, 0.1, 1, 0], [0.1, 0, 0, 1]], np.float32)
    assert zero_shot(e, images, ["animal", "vehicle"], classes=["animal", "vehicle"]).accuracy == 0.0
    hierarchy = {"animal": ["cat"], "vehicle": ["car"]}
    res = zero_shot(e, images, ["animal", "vehicle"], classes=["animal", "vehicle"], subclasses=hierarchy)
    assert res.accuracy == 1.0 and res.predictions == ["animal", "vehicle"]
    # the score is the best of the class's own prompt and its subclasses'
    np.testing.assert_allclose(class_scores(e, images, ["animal", "vehicle"], subclasses=hierarchy),
                               [[1, 0.1], [0.1, 1]], atol=1e-6)


def test_a_class_is_found_by_its_members_votes():
    e = WordEmbedder()
    # the first image is nearest "cat" (an animal), then "car"; the second nearest "car"
    images = np.array([[0, 0, 1, 0.6], [0, 0, 0.3, 1]], np.float32)
    members = {"animal": ["cat"], "vehicle": ["car"]}
    assert zero_shot(e, images, ["animal", "vehicle"], members=members, templates=("{}",)).accuracy == 1.0
    votes = member_votes(e, images, ["animal", "vehicle"], members, k=2, temperature=0.1)
    np.testing.assert_allclose(votes.sum(axis=1), 1.0)
    # two votes each, weighted exp(cosine / 0.1): 1 against exp(-4) and exp(-7) against 1
    np.testing.assert_allclose(votes[0], [1 / (1 + np.exp(-4)), np.exp(-4) / (1 + np.exp(-4))], rtol=1e-5)
    np.testing.assert_allclose(votes[1], [np.exp(-7) / (1 + np.exp(-7)), 1 / (1 + np.exp(-7))], rtol=1e-5)
    # k=1: only the nearest name votes
    np.testing.assert_allclose(member_votes(e, images, ["animal", "vehicle"], members, k=1), [[1, 0], [0, 1]])
    # a class with no members gets no votes; no members at all is an error
    assert member_votes(e, images, ["animal", "vehicle"], {"animal": ["cat"]})[:, 1].tolist() == [0, 0]
    with pytest.raises(ValueError, match="no class has any member"):
        member_votes(e, images, ["animal", "vehicle"], {})


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg, 1.0) == pytest.approx(0.1)
    assert lr_at(9, cfg, 1.0) == pytest.approx(1.0)
    assert lr_at(10, cfg, 1.0) == pytest.approx(1.0)
    assert lr_at(55, cfg, 1.0) == pytest.approx(0.55)
    assert lr_at(100, cfg, 1.0) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg, 1.0) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
