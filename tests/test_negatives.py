"""Hard negative captions (NegCLIP): the caption edits, the loss with one more column per image, the
batches that carry them (resumed bit for bit), and a tiny CLIP that learns to reject them."""

import json
import math
import random

import numpy as np
import pytest
import torch
from tests.conftest import read_metrics

import polymodal
from polymodal.config import ImageTransformConfig
from polymodal.data import TrainStream
from polymodal.processing.tokenizer import clip_tokenizer
from polymodal.train import ClipLoss
from polymodal.train.config import TrainConfig
from polymodal.train.negatives import COLOURS, COUNTS, SHAPES, hard_negative
from polymodal.train.trainer import train

CONTRAST = {*SHAPES, *(s + "s" for s in SHAPES), *COLOURS, *COUNTS, "shape", "shapes", "left", "right",
            "above", "below"}


def _changed(a: str, b: str) -> list[tuple[str, str]]:
    words = lambda t: t.replace(",", " ").split()  # noqa: E731
    return [(x, y) for x, y in zip(words(a), words(b), strict=True) if x != y]


@pytest.mark.parametrize("text", [
    "a large blue triangle, a large yellow triangle, a small red square and a small purple square",
    "two large white stars and a large yellow star on a noise background",
    "two red circles left of a blue square",
    "a large orange star above a small blue circle",
])
def test_a_negative_changes_one_word_of_a_contrast_set(text):
    rng = random.Random(0)
    negatives = {hard_negative(text, rng) for _ in range(60)}
    for neg in negatives:
        changed = _changed(text, neg)  # counts may also change their noun: 'two red circles' -> 'one red circle'
        assert 1 <= len(changed) <= 2 and all(x in CONTRAST and y in CONTRAST for x, y in changed), (text, neg)
        if len(changed) == 2:
            assert changed[0][0] in COUNTS and changed[1][0].rstrip("s") in SHAPES
    assert len(negatives) > 5  # kinds and words are drawn, not fixed


def test_negative_grammar_relations_and_nothing_to_change():
    rng = random.Random(1)
    seen = {hard_negative("one shape on a plain background", rng) for _ in range(30)}
    assert seen == {f"{n} shapes on a plain background" for n in ("two", "three", "four")}
    seen = {hard_negative("two red circles", rng) for _ in range(60)}
    assert "one red circle" in seen and "three red circles" in seen and "two red stars" in seen
    assert hard_negative("a red square left of a blue circle", random.Random(5)) != \
        "a red square left of a blue circle"
    flips = {hard_negative("a star above a circle", random.Random(s)) for s in range(40)}
    assert "a star below a circle" in flips
    only = {hard_negative("two red circles left of a blue square", random.Random(s), kinds=["relation"])
            for s in range(5)}
    assert only == {"two red circles right of a blue square"}
    assert hard_negative("a red circle", rng, kinds=["relation"]) is None
    assert hard_negative("an emoji of a grinning face", rng) is None
    assert hard_negative("", rng) is None
    a = [hard_negative("two red circles left of a blue square", random.Random(3)) for _ in range(2)]
    assert a[0] == a[1]  # the same draw for the same generator state


def reference(img, txt, neg, has, logit_scale) -> float:
    """Image i against every text and its own negative; text j against every image; float64."""
    img, txt, neg, scale = img.double(), txt.double(), neg.double(), math.exp(float(logit_scale))
    n = img.shape[0]
    logits = [[scale * float(img[i] @ txt[j]) for j in range(n)] for i in range(n)]
    per_image = 0.0
    for i in range(n):
        row = logits[i] + ([scale * float(img[i] @ neg[i])] if has[i] else [])
        per_image -= logits[i][i] - math.log(sum(math.exp(x) for x in row))
    per_text = -sum(logits[j][j] - math.log(sum(math.exp(logits[i][j]) for i in range(n))) for j in range(n))
    return (per_image / n + per_text / n) / 2


def test_loss_with_negatives_equals_hand_written():
    torch.manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s), dim=-1)  # noqa: E731
    img, txt, neg = unit(6, 8), unit(6, 8), unit(6, 8)
    has = torch.tensor([True, False, True, True, False, True])
    scale = torch.tensor(math.log(1 / 0.07))
    got = ClipLoss()(img, txt, scale, negatives=neg, has_negative=has)["contrastive_loss"].item()
    assert abs(got - reference(img, txt, neg, has, scale)) < 1e-5
    plain = ClipLoss()(img, txt, scale)["contrastive_loss"].item()
    none = ClipLoss()(img, txt, scale, negatives=neg, has_negative=torch.zeros(6, dtype=torch.bool))
    assert abs(none["contrastive_loss"].item() - plain) < 1e-6  # no negative: the plain loss
    assert got > plain  # a column more can only raise each row's loss


def _scene_folder(root, n=10):
    from PIL import Image
    (root / "img").mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(root / "img" / f"{i}.png")
        for text in (f"{('two', 'three')[i % 2]} red circles left of a blue square", f"photo {i}"):
            lines.append(json.dumps({"image": f"img/{i}.png", "text": text}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_batches_carry_negatives_and_resume_bit_for_bit(tmp_path):
    root = _scene_folder(tmp_path / "data")
    kwargs = dict(transform=ImageTransformConfig(size=16, resize=16), tokenizer=clip_tokenizer(), batch_size=4,
                  seed=3, negatives=True)

    def take(stream, k):
        it = iter(stream)
        out = [next(it) for _ in range(k)]
        stream.close()
        return out

    straight = take(TrainStream(root, **kwargs), 8)
    b = straight[0]
    assert b["negative_ids"].shape == b["input_ids"].shape and b["negative_mask"].shape == b["attention_mask"].shape
    has = torch.cat([x["has_negative"] for x in straight])
    assert has.any() and not has.all()  # 'photo i' has nothing to change
    for x in straight:  # a row with a negative differs from its caption; one without repeats it
        same = (x["negative_ids"] == x["input_ids"]).all(1)
        assert torch.equal(same, ~x["has_negative"])
    first = TrainStream(root, **kwargs)
    take(first, 5)
    resumed = take(TrainStream(root, start=json.loads(json.dumps(first.state_dict())), **kwargs), 3)
    for a, r in zip(straight[5:], resumed, strict=True):
        for name in ("input_ids", "negative_ids", "negative_mask", "has_negative"):
            assert torch.equal(a[name], r[name])


def test_a_tiny_clip_learns_to_reject_its_negatives(shapes_data, tmp_path):
    """Colour-and-shape captions: after training with their negatives, a test image scores its own
    caption above a changed one far more often than chance (0.5)."""
    cfg = TrainConfig(model=str(shapes_data / "model.json"), data=str(shapes_data), batch_size=32, steps=120,
                      lr=1e-3, warmup=10, weight_decay=0.05, save_every=60, log_every=10, seed=0, augment=False,
                      hard_negatives=True)
    with pytest.raises(ValueError, match="accum"):
        cfg.replace(accum=2)
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    losses = [m["loss"] for m in read_metrics(run)]
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses
    model = polymodal.load(run)
    records = [json.loads(line) for line in (shapes_data / "captions.jsonl").read_text().splitlines()]
    tests = {r["image"]: r["category"] for r in records if r["split"] == "test"}
    images = model.encode_image([str(shapes_data / p) for p in tests])
    rng, right = random.Random(0), []
    for vector, category in zip(images, tests.values(), strict=True):
        true = f"a {category}"
        negs = [hard_negative(true, rng) for _ in range(4)]
        scores = model.encode_text([true, *negs]) @ vector
        right += [scores[0] > s for s in scores[1:]]
    assert np.mean(right) > 0.8, np.mean(right)
