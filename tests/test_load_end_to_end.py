"""`polymodal.load()` + `encode_*` give what transformers gives for the same files and strings:
its image processor, its tokenizer and its model, against ours, from one directory."""

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

import polymodal  # noqa: E402
from polymodal.checkpoints import hf_clip  # noqa: E402
from polymodal.checkpoints.state import load_exact  # noqa: E402
from polymodal.models.clip import CLIP  # noqa: E402

BPE = resources.files("polymodal") / "assets" / "clip-bpe"
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "logo.png"]
TEXTS = ["a photo of a cat", "An ASTRONAUT in a white suit!", "a cup of coffee on a saucer",
         "a rocket 🚀 launching at night", "café crème, naïve résumé", ""]


def photo(name):
    return str(resources.files("skimage") / "data" / name)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        vision_config=dict(image_size=64, patch_size=16, hidden_size=48, intermediate_size=96,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=24)
    model = transformers.CLIPModel(cfg).eval()
    d = tmp_path_factory.mktemp("hfclip")
    model.save_pretrained(d)
    bpe = tmp_path_factory.mktemp("bpe")
    for name in ("vocab.json", "merges.txt"):  # from_pretrained: the constructor alone gives wrong ids
        (bpe / name).write_bytes((BPE / name).read_bytes())
    tok = transformers.CLIPTokenizer.from_pretrained(bpe)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    transformers.CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(d)
    return d, model, tok, proc


def test_encode_image_equals_transformers_pipeline(hf_dir):
    d, ref, _, proc = hf_dir
    ours = polymodal.load(d)
    images = [Image.open(photo(p)) for p in PHOTOS]
    with torch.no_grad():
        pixels = proc(images=images, return_tensors="pt").pixel_values
        feats = ref.get_image_features(pixel_values=pixels)
        feats = feats if torch.is_tensor(feats) else feats.pooler_output
        want = torch.nn.functional.normalize(feats, dim=-1).numpy()
    got = ours.encode_image([photo(p) for p in PHOTOS[:3]] + [Path(photo(PHOTOS[3])).read_bytes()] + images[4:])
    assert got.dtype == np.float32 and got.shape == (6, 24)
    assert np.abs(got - want).max() <= 1e-5


def test_encode_text_equals_transformers_pipeline(hf_dir):
    d, ref, tok, _ = hf_dir
    ours = polymodal.load(d)
    texts = TEXTS[:-1] + ["a very long caption " * 40]
    enc = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        feats = ref.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        feats = feats if torch.is_tensor(feats) else feats.pooler_output
        want = torch.nn.functional.normalize(feats, dim=-1).numpy()
    got = ours.encode_text(texts)
    assert np.abs(got - want).max() <= 1e-5
    # length-sorted batching changes nothing: one text at a time gives the same vectors
    ours.batch_size = 2
    assert np.abs(ours.encode_text(texts) - got).max() <= 1e-6


def test_similarity_probs_and_tokenizer(hf_dir):
    d, ref, tok, _ = hf_dir
    ours = polymodal.load(d)
    img, txt = ours.encode_image(photo("chelsea.png")), ours.encode_text(TEXTS[:3])
    sim = ours.similarity(img, txt)
    np.testing.assert_allclose(sim, img @ txt.T, atol=1e-6)
    p = ours.probs(img, txt)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    scale = ref.logit_scale.exp().item()
    np.testing.assert_allclose(p, torch.softmax(torch.tensor(scale * sim), -1).numpy(), atol=1e-6)
    t = polymodal.load_tokenizer(d)
    assert t.encode("a photo of a cat") == tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert t.decode(t.encode("a photo of a cat")) == "a photo of a cat"


def test_zero_shot_is_softmax_over_label_prompts(hf_dir):
    ours = polymodal.load(hf_dir[0])
    img = ours.encode_image([photo("chelsea.png"), photo("coffee.png")])
    ranked = ours.zero_shot(img, ["cat", "cup", "rocket"], template="a photo of a {}.")
    want = ours.probs(img, ours.encode_text(["a photo of a cat.", "a photo of a cup.", "a photo of a rocket."]))
    for row, p in zip(ranked, want, strict=True):
        assert [label for label, _ in row] == [["cat", "cup", "rocket"][j] for j in np.argsort(-p)]
        np.testing.assert_allclose(sorted((q for _, q in row), reverse=True), np.sort(p)[::-1], atol=1e-6)
    assert ours.classify([photo("chelsea.png"), photo("coffee.png")], ["cat", "cup", "rocket"]) == ranked
    with pytest.raises(ValueError, match="no '{}'"):
        ours.zero_shot(img, ["cat"], template="a photo")


def test_bad_text_is_refused(hf_dir):
    from polymodal.tasks.embed import TextError

    ours = polymodal.load(hf_dir[0])
    with pytest.raises(TextError, match="text 2: empty text"):
        ours.encode_text(["fine", "   "])
    with pytest.raises(TextError, match="text 1: expected a string"):
        ours.encode_text([None])
    assert ours.encode_text("x" * 10_000_000).shape == (1, 24)  # 10 MB: truncated, not refused


def test_batches_skip_and_report_bad_images(hf_dir, tmp_path):
    from polymodal.processing.image import ImageError

    ours = polymodal.load(hf_dir[0])
    (tmp_path / "empty.png").write_bytes(b"")
    bad = [str(tmp_path / "empty.png"), str(tmp_path / "missing.png")]
    res = ours.embed_images([photo("chelsea.png"), bad[0], photo("coffee.png"), bad[1]])
    assert res.ok == [0, 2] and res.vectors.shape == (2, 24)
    assert [i for i, _ in res.errors] == [1, 3]
    assert "empty.png" in res.errors[0][1] and "missing.png" in res.errors[1][1]
    np.testing.assert_allclose(res.vectors, ours.encode_image([photo("chelsea.png"), photo("coffee.png")]), atol=1e-6)
    with pytest.raises(ImageError, match="empty.png"):
        ours.encode_image([photo("chelsea.png"), bad[0]])


def test_full_vit_b32_shape_parity():
    """One check at the real ViT-B/32 size (random weights), to catch scale-only bugs."""
    torch.manual_seed(0)
    ref = transformers.CLIPModel(transformers.CLIPConfig()).eval()
    cfg = hf_clip.config_from_hf(ref.config.to_dict())
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.patch_size, cfg.embed_dim) == (768, 12, 32, 512)
    ours = load_exact(CLIP(cfg), hf_clip.state_from_hf(ref.state_dict(), cfg)).eval()
    pixels = torch.randn(2, 3, 224, 224)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407], [49406, 2368, 49407, 49407, 49407, 49407, 49407]])
    mask = (torch.arange(7) < torch.tensor([[7], [3]])).long()
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        o = ours(pixels, ids, mask)
    assert (o.image_embeds - r.image_embeds).abs().max() <= 1e-5
    assert (o.text_embeds - r.text_embeds).abs().max() <= 1e-5
    assert (o.logits_per_image - r.logits_per_image).abs().max() <= 1e-5
