"""The Flamingo recipe end to end on tiny data: a small scenes set and clips set built by polymodal's own
builders, a tiny random frozen LM with a word-level tokenizer, the embedded default CLIP's vision tower.
The run trains, evaluates before and after, saves a model that `polymodal.load_vlm` reads (ask with
several images, video, shots; the CLI), resumes when started again, leaves the LM bit-identical."""

import json

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers
from typer.testing import CliRunner

import polymodal
from polymodal.checkpoints.gguf import save_lm
from polymodal.cli import app
from polymodal.config import LMConfig, PerceiverConfig
from polymodal.data.interleaved import IMAGE, read_clips, read_scenes
from polymodal.data.scenes import build_clips, build_scenes
from polymodal.models.lm import DecoderLM
from polymodal.processing.tokenizer import Tokenizer
from polymodal.train.flamingo import FlamingoTrainConfig
from polymodal.train.flamingo_recipe import run_recipe

SPECIALS = ["<pad>", "<s>", "</s>", IMAGE]


def _vocab(scenes, clips) -> list[str]:
    pre = pre_tokenizers.Whitespace()
    texts = ["Question: Answer: Caption: Video: . \n what moves ?"]
    texts += [t for s in scenes for t in s["captions"] + [q["q"] + " " + q["a"] for q in s["qa"]]]
    texts += [t for c in clips for t in c["captions"]]
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    return SPECIALS + words


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("flamingo-data")
    build_scenes(root / "scenes", n=60, size=32)
    build_clips(root / "clips", n=24, frames=4, size=32)
    scenes = read_scenes(root / "scenes", "train") + read_scenes(root / "scenes", "test")
    clips = read_clips(root / "clips", "train") + read_clips(root / "clips", "test")
    words = _vocab(scenes, clips)
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = Tokenizer(backend, kind="bpe", context_length=256, pad_id=0, bos_id=1, eos_id=2)
    torch.manual_seed(0)
    lm = DecoderLM(LMConfig(family="llama", vocab_size=len(words), width=48, layers=4, heads=4, mlp_dim=96,
                            max_positions=256, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    save_lm(lm.eval(), root / "lm", tok)
    return root


def _run(root, out, steps):
    return run_recipe(out, lm_path=root / "lm", scenes=root / "scenes", clips=root / "clips",
                      train=FlamingoTrainConfig(steps=steps, batch_size=4, lr=3e-3, warmup=3),
                      perceiver=PerceiverConfig(latents=4, depth=1, heads=2, head_dim=16, max_frames=4),
                      cross_every=2, image_token=IMAGE, eval_vqa=8, eval_clips=4, shots=1, checkpoint_every=10)


def test_recipe_trains_evaluates_saves_and_resumes(setup, tmp_path):
    out = tmp_path / "run"
    result = _run(setup, out, 60)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 61))
    first, last = sum(m["loss"] for m in lines[:5]) / 5, sum(m["loss"] for m in lines[-10:]) / 10
    assert last < 0.92 * first, (first, last)  # it learns (a random frozen LM: about 0.88 here)
    assert lines[-1]["gate"] > 0.01  # the gates opened
    for doc in (result["start"], result["end"]):
        assert doc["vqa"]["n"] == 8 and doc["video"]["n"] >= 1
        assert set(doc["video"]) >= {"direction", "shape", "colour"}
    assert json.loads((out / "eval_end.json").read_text())["vqa"] == result["end"]["vqa"]

    # the frozen LM is bit-identical to the one it started from
    vlm = polymodal.load_vlm(out)
    lm = polymodal.checkpoints.gguf.load_lm(setup / "lm")[0]
    for k, v in lm.state_dict().items():
        assert torch.equal(v, vlm.model.lm.state_dict()[k]), k

    # resume: a second start with more steps continues from the checkpoint
    _run(setup, out, 70)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 71))


def test_saved_model_answers_through_the_task_api_and_cli(setup, tmp_path):
    out = tmp_path / "run"
    _run(setup, out, 2)
    vlm = polymodal.load_vlm(out)
    scenes = read_scenes(setup / "scenes", "train")
    clip = read_clips(setup / "clips", "train")[0]
    a, b = scenes[0]["image"], scenes[1]["image"]
    assert isinstance(vlm.ask(a, "how many shapes are there?", max_new_tokens=3), str)
    assert isinstance(vlm.ask([a, b], f"{IMAGE}Caption: a shape.\n{IMAGE}Caption:", max_new_tokens=3), str)
    assert isinstance(vlm.ask(None, "what moves?", video=clip["frames"][0].rsplit("/", 1)[0], max_new_tokens=3), str)
    shots = tmp_path / "shots.jsonl"
    shots.write_text(json.dumps({"image": a, "question": "how many shapes are there?", "answer": "one"}) + "\n")
    want = vlm.ask(b, "how many shapes are there?", shots=shots, max_new_tokens=3)
    with pytest.raises(ValueError, match="markers"):
        vlm.ask([a], f"{IMAGE}{IMAGE} two markers, one image")

    runner = CliRunner()
    r = runner.invoke(app, ["ask", "how many shapes are there?", "-m", str(out), "--image", b, "--shots", str(shots),
                            "--max-new-tokens", "3", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["answer"] == want
    gif = tmp_path / "clip.gif"
    from PIL import Image

    frames = [Image.open(f) for f in clip["frames"]]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    r = runner.invoke(app, ["ask", "--video", str(gif), "what moves?", "-m", str(out), "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["chat", a, "-m", str(out), "--max-new-tokens", "3"],
                      input=f"how many shapes are there?\n/image {b}\nand here?\n/quit\n")
    assert r.exit_code == 0, r.output
    assert len(r.stdout.splitlines()) == 2
    r = runner.invoke(app, ["ask", "--video", str(tmp_path / "none.gif"), "what?", "-m", str(out)])
    assert r.exit_code == 2 and r.stderr.startswith("error:")
    folder = tmp_path / "pictures"  # folder mode: every image captioned as `caption` does, resumably
    folder.mkdir()
    for i, scene in enumerate(scenes[:2]):
        Image.open(scene["image"]).save(folder / f"{i}.png")
    r = runner.invoke(app, ["caption", str(folder), "-m", str(out), "--max-new-tokens", "3",
                            "--out", str(tmp_path / "captions.jsonl"), "--json"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [x["caption"] for x in lines] == [vlm.caption(folder / f"{i}.png", max_new_tokens=3) for i in range(2)]
