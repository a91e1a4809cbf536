"""Every `polymodal` command end to end on scikit-image's photos, with a tiny random CLIP,
and every kind of bad input: one stderr line naming it, exit code 2, or skipped in a batch."""

import json
import struct
import zlib
from importlib import resources

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
from polymodal.processing.tokenizer import clip_tokenizer

pytest.importorskip("skimage")
DATA = resources.files("skimage") / "data"
PHOTOS = [
    str(DATA / name) for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png")
]
TEXTS = ["a photo of an astronaut", "a photo of a cat", "a cup of coffee"]


def run(*args, code: int = 0):
    """Invoke the CLI (stdout and stderr captured apart); check the exit code, never a traceback."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.output
    return result


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = CLIPConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64),
        text=TextConfig(width=32, layers=1, heads=2, mlp_dim=64),
        embed_dim=16,
        image_transform=ImageTransformConfig(size=32, resize=32),
    )
    return save_pretrained(CLIP(cfg), tmp_path_factory.mktemp("tiny") / "clip", clip_tokenizer())


@pytest.fixture(scope="module")
def embedder(model_dir):
    return polymodal.load(model_dir, device="cpu")


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels (and holds none)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    )


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.png").write_text("this is not an image\n")
    (d / "empty.png").write_bytes(b"")
    data = (DATA / "astronaut.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (1, 20000), "gray").save(d / "strip.png")
    (d / "huge.png").write_bytes(_png_header(15000, 15000))
    return {
        "missing": d / "missing.png",
        "not-an-image": d / "notes.png",
        "zero-byte": d / "empty.png",
        "truncated": d / "truncated.png",
        "1x20000": d / "strip.png",
        "over-pixel-cap": d / "huge.png",
    }


# --- pictures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [16, 32])
def test_patches(tmp_path, patch):
    out = tmp_path / "grid.png"
    doc = json.loads(run("patches", PHOTOS[0], "--patch-size", patch, "--out", out, "--json").stdout)
    assert doc == {"out": str(out), "patches": (224 // patch) ** 2, "patch_size": patch, "size": 224}
    with Image.open(out) as im:
        assert im.width > 2 * 224 and im.height > 224


def test_patches_human_output_and_bad_patch_size(tmp_path):
    assert "196 patches" in run("patches", PHOTOS[1], "--out", tmp_path / "g.png").stdout
    assert "does not divide" in one_line(run("patches", PHOTOS[1], "--patch-size", 15, code=2).stderr)


def test_preprocess(tmp_path, model_dir):
    doc = json.loads(
        run(
            "preprocess", PHOTOS[3], "--out", tmp_path / "p.png", "--seen", tmp_path / "s.png", "--json"
        ).stdout
    )
    assert doc["original"] == [640, 427] and doc["size"] == 224 and doc["mode"] == "crop"
    assert Image.open(tmp_path / "s.png").size == (224, 224)
    assert Image.open(tmp_path / "p.png").width > 2 * 224
    run(
        "preprocess",
        PHOTOS[3],
        "--model",
        model_dir,
        "--mode",
        "letterbox",
        "--out",
        tmp_path / "p2.png",
        "--seen",
        tmp_path / "s2.png",
    )
    assert Image.open(tmp_path / "s2.png").size == (32, 32)


# --- embeddings ---------------------------------------------------------------------------------


def test_embed_images_and_texts(tmp_path, model_dir, embedder):
    out = tmp_path / "img.npy"
    args = [a for p in PHOTOS for a in ("--image", p)]
    doc = json.loads(run("embed", "--model", model_dir, *args, "--out", out, "--json").stdout)
    assert doc == {"shape": [len(PHOTOS), 16], "out": str(out), "skipped": []}
    vectors = np.load(out)
    assert vectors.dtype == np.float32 and vectors.shape == (len(PHOTOS), 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(vectors, embedder.encode_image(PHOTOS), atol=1e-5)

    out = tmp_path / "txt.npy"
    run("embed", "-m", model_dir, *[a for t in TEXTS for a in ("--text", t)], "--out", out)
    np.testing.assert_allclose(np.load(out), embedder.encode_text(TEXTS), atol=1e-5)


def test_similarity_plot_and_json(tmp_path, model_dir, embedder):
    images = [a for p in PHOTOS[:3] for a in ("--image", p)]
    texts = [a for t in TEXTS for a in ("--text", t)]
    plot = tmp_path / "sim.png"
    doc = json.loads(
        run("similarity", "--model", model_dir, *images, *texts, "--plot", plot, "--json").stdout
    )
    img, txt = embedder.encode_image(PHOTOS[:3]), embedder.encode_text(TEXTS)
    np.testing.assert_allclose(doc["cosine"], embedder.similarity(img, txt), atol=1e-5)
    np.testing.assert_allclose(doc["probs"], embedder.probs(img, txt), atol=1e-5)
    assert doc["images"] == PHOTOS[:3] and doc["texts"] == TEXTS and doc["plot"] == str(plot)
    assert Image.open(plot).size[0] > 400

    human = run("similarity", "--model", model_dir, *images, *texts).stdout
    assert "cosine similarity" in human and "astronaut.png" in human and "probability" in human


def test_classify_json(model_dir):
    labels = ["cat", "astronaut", "coffee", "rocket"]
    doc = json.loads(
        run(
            "classify", "--model", model_dir, *PHOTOS[:3], "--labels", ",".join(labels), "--top", 10, "--json"
        ).stdout
    )
    assert [r["image"] for r in doc["results"]] == PHOTOS[:3]
    for r in doc["results"]:
        assert sorted(x["label"] for x in r["labels"]) == sorted(labels)
        assert abs(sum(x["prob"] for x in r["labels"]) - 1) < 1e-5
        probs = [x["prob"] for x in r["labels"]]
        assert probs == sorted(probs, reverse=True)
    top = run("classify", "-m", model_dir, PHOTOS[0], "--labels", "cat, dog,car", "--top", 2).stdout
    assert "astronaut.png" in top and sum(label in top for label in ("cat", "dog", "car")) == 2


def test_classify_by_members(model_dir, tmp_path):
    groups = {"animal": ["cat", "dog", "horse"], "thing": ["cup", "rocket"]}
    path = tmp_path / "members.json"
    path.write_text(json.dumps(groups))
    doc = json.loads(run("classify", "-m", model_dir, *PHOTOS[:2], "--members", path, "--json").stdout)
    for r in doc["results"]:
        assert sorted(x["label"] for x in r["labels"]) == ["animal", "thing"]  # the labels are the file's keys
        assert abs(sum(x["prob"] for x in r["labels"]) - 1) < 1e-5
    import polymodal
    from polymodal.tasks.evaluate import member_votes

    embedder = polymodal.load(model_dir)
    votes = member_votes(embedder, embedder.encode_image(PHOTOS[:2]), ["animal", "thing"], groups, ("a photo of a {}.",))
    for r, row in zip(doc["results"], votes, strict=True):
        assert {x["label"]: round(x["prob"], 5) for x in r["labels"]} == {"animal": round(row[0], 5),
                                                                         "thing": round(row[1], 5)}
    path.write_text('{"animal": []}')
    assert "at least one name" in one_line(run("classify", "-m", model_dir, PHOTOS[0], "--members", path,
                                               code=2).stderr)
    path.write_text("{not json")
    assert "not a readable JSON" in one_line(run("classify", "-m", model_dir, PHOTOS[0], "--members", path,
                                                 code=2).stderr)


def test_convert_transformers_clip(tmp_path, embedder):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    text = dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    ref = transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    ).eval()
    ref.save_pretrained(tmp_path / "hf")
    doc = json.loads(run("convert", tmp_path / "hf", tmp_path / "own", "--json").stdout)
    assert doc["out"] == str(tmp_path / "own") and "model.safetensors" in doc["files"]

    ours = polymodal.load(tmp_path / "own", device="cpu")
    from polymodal.processing.image import load_image, preprocess

    pixels = preprocess([load_image(p) for p in PHOTOS[:2]], ours.transform)
    tokens = ours.tokenizer(TEXTS)
    with torch.no_grad():
        r = ref(pixel_values=pixels, **tokens)
    np.testing.assert_allclose(ours.encode_image(PHOTOS[:2]), r.image_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours.encode_text(TEXTS), r.text_embeds.numpy(), atol=1e-5)


def test_demo(tmp_path):
    result = run("demo", "--random", "--out", tmp_path)
    assert "randomly initialised" in result.stdout and "meaningless" in result.stdout
    for name in ("patches.png", "preprocess.png", "similarity.png", "random-clip/model.safetensors"):
        assert (tmp_path / name).is_file(), name
        assert name in result.stdout or name.startswith("random-clip")
    assert Image.open(tmp_path / "similarity.png").width > 600
    assert polymodal.load(tmp_path / "random-clip").dim == 128


# --- bad input ----------------------------------------------------------------------------------

BAD = ["missing", "not-an-image", "zero-byte", "truncated", "1x20000", "over-pixel-cap"]
WHY = {
    "missing": "no such file",
    "not-an-image": "not an image",
    "zero-byte": "empty",
    "truncated": "truncated",
    "1x20000": "too thin",
    "over-pixel-cap": "pixels",
}


@pytest.mark.parametrize("kind", BAD)
def test_bad_single_image_is_one_line_and_exit_2(kind, bad, model_dir, tmp_path):
    path = bad[kind]
    for args in (
        ["patches", path, "--out", tmp_path / "g.png"],
        ["preprocess", path],
        ["embed", "--model", model_dir, "--image", path, "--out", tmp_path / "e.npy"],
    ):
        line = one_line(run(*args, code=2).stderr)
        assert path.name in line and WHY[kind] in line, line
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "e.npy").exists()


def test_batches_skip_bad_images(bad, model_dir, embedder, tmp_path):
    inputs = [PHOTOS[0], bad["missing"], PHOTOS[1], bad["truncated"]]
    out = tmp_path / "e.npy"
    result = run(
        "embed", "--model", model_dir, *[a for p in inputs for a in ("--image", p)], "--out", out, "--json"
    )
    doc = json.loads(result.stdout)
    assert doc["shape"] == [2, 16] and [s["input"] for s in doc["skipped"]] == [
        str(inputs[1]),
        str(inputs[3]),
    ]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "missing.png" in lines[0] and "truncated.png" in lines[1]
    np.testing.assert_allclose(np.load(out), embedder.encode_image(PHOTOS[:2]), atol=1e-5)

    result = run(
        "similarity", "-m", model_dir, "-i", PHOTOS[0], "-i", bad["1x20000"], "-t", "a cat", "--json"
    )
    assert json.loads(result.stdout)["images"] == [PHOTOS[0]] and "strip.png" in one_line(result.stderr)
    result = run("classify", "-m", model_dir, bad["zero-byte"], PHOTOS[2], "--labels", "cat,cup", "--json")
    assert [r["image"] for r in json.loads(result.stdout)["results"]] == [PHOTOS[2]]
    assert "empty.png" in one_line(result.stderr)

    result = run(
        "classify", "-m", model_dir, bad["zero-byte"], bad["over-pixel-cap"], "--labels", "a,b", code=2
    )
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3 and "empty.png" in lines[0] and "huge.png" in lines[1] and "none" in lines[2]


def test_bad_text_model_and_options(model_dir, tmp_path):
    assert "empty text" in one_line(run("embed", "-m", model_dir, "--text", "  ", code=2).stderr)
    big = "the quick brown fox jumps over the lazy dog " * 240_000  # ~10 MB
    out = tmp_path / "t.npy"
    result = run("embed", "-m", model_dir, "--text", big, "--text", "a cat", "--out", out, "--json")
    assert json.loads(result.stdout)["shape"] == [2, 16] and np.load(out).shape == (2, 16)
    line = one_line(result.stderr)
    assert "text 1" in line and "77 tokens" in line and len(line) < 300

    missing = tmp_path / "no-model"
    assert "no-model" in one_line(run("embed", "-m", missing, "--text", "a", code=2).stderr)
    assert "no-model" in one_line(run("convert", missing, tmp_path / "x", code=2).stderr)
    assert "not a checkpoint" in one_line(run("convert", tmp_path, tmp_path / "x", code=2).stderr)
    assert "--image or --text" in one_line(run("embed", "-m", model_dir, code=2).stderr)
    assert "template" in one_line(
        run("classify", "-m", model_dir, PHOTOS[0], "--labels", "a", "--template", "no slot", code=2).stderr
    )
