"""The speech bridge (models/speech_bridge.py, train/speech_bridge.py, tasks/speech_chat.py) on tiny parts
saved locally: a tiny random Whisper (the frozen encoder), a tiny Llama-family LM with a ChatML template
(the frozen LLM), and a handful of espeak-ng clips.

The soft prompt sits in the first user turn exactly where training puts it; training makes the loss
fall and the answers tell the words apart; the frozen parts stay bit-identical; the saved bridge
refers to its frozen parts instead of copying them; the CLI answers with --json; bad audio gets one
clear line."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from polymodal.checkpoints.gguf import save_lm
from polymodal.checkpoints.speech_io import load_speech_bridge
from polymodal.checkpoints.state import CheckpointError, read_state_dict
from polymodal.config import LMConfig, QFormerConfig, SpeechBridgeConfig, WhisperConfig
from polymodal.models.lm import DecoderLM
from polymodal.models.speech_bridge import SpeechBridge, SpeechFeatures
from polymodal.models.whisper import Whisper
from polymodal.processing.audio import AudioError
from polymodal.processing.tokenizer import Tokenizer
from polymodal.tasks.asr import save_whisper
from polymodal.tasks.speech_chat import SpeechChat, encode_clips, speech_mel
from polymodal.train.speech_bridge import (
    SpeechRecipe,
    prompt_key,
    speech_batches,
    teacher_answers,
    teacher_prompt,
    train_speech,
)
from polymodal.train.vlm import ChatFormat, StageConfig, chat_loss

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng speaks the clips (make setup)")

SPECIALS = ["<s>", "<pad>", "<|im_start|>", "<|im_end|>"]  # ids 0..3
IM_END = 3
CHATML = ("{% for m in messages %}{% if loop.first and m.role != 'system' %}<|im_start|>system\nBe brief."
          "<|im_end|>\n{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("apple", "banana", "window", "seven")
VOCAB = ("what did they say transcribe the audio repeat exactly was said write down you heard someone "
         "is this a question or request main word in answer one sentence speaker asking for summarise few words "
         "system user assistant be brief " + " ".join(WORDS))


def tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([VOCAB, VOCAB.upper(), VOCAB.capitalize()] * 3,
                                trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(backend, "bpe", 256, pad_id=1, bos_id=0, eos_id=IM_END)


TINY_WHISPER = WhisperConfig(vocab_size=100, width=32, encoder_layers=1, decoder_layers=1, encoder_heads=2,
                             decoder_heads=2, encoder_mlp_dim=64, decoder_mlp_dim=64, eos_token_id=96,
                             no_timestamps_token_id=97, prefix_ids=(98,), begin_suppress_tokens=(96,))
TINY_QFORMER = {"width": 32, "layers": 1, "heads": 4, "mlp_dim": 64, "num_query_tokens": 16,
                "cross_attention_frequency": 1}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny Whisper directory, a tiny LM directory with ChatML, and espeak-ng clips of the words."""
    from polymodal.data.speech import speak

    root = tmp_path_factory.mktemp("speech")
    torch.manual_seed(0)
    tok = tokenizer()
    whisper = Whisper(TINY_WHISPER).eval()
    with torch.no_grad():  # at PyTorch's initial scale the random stem's output is ~5% sound, ~95% position
        for conv in (whisper.encoder.conv1, whisper.encoder.conv2):
            conv.weight.mul_(4)
    save_whisper(whisper, tok.backend, root / "whisper")
    lm_cfg = LMConfig(family="llama", vocab_size=tok.backend.get_vocab_size(), width=32, layers=2, heads=4,
                      kv_heads=2, mlp_dim=64, act="silu", max_positions=256, tie_embeddings=False,
                      bos_token_id=0, eos_token_id=IM_END, pad_token_id=1)
    save_lm(DecoderLM(lm_cfg).eval(), root / "lm", tok, CHATML)
    for w in WORDS:  # a voice none of the training clips has
        speak(w, {"voice": "en-us", "speed": 150, "pitch": 50}, root / f"{w}.wav")
    return root


def recipe(root: Path, **changes) -> SpeechRecipe:
    return SpeechRecipe(**{"whisper": str(root / "whisper"), "lm": str(root / "lm"), "qformer": TINY_QFORMER,
                           "texts": WORDS, "voices": 3, "kinds": {"transcribe": 1.0}, "max_answer_tokens": 4,
                           "save_every": 40, "train": StageConfig(steps=150, batch_size=8, lr=3e-3, warmup=5),
                           **changes})


def tiny_bridge(root: Path) -> tuple[SpeechBridge, Tokenizer]:
    from polymodal.checkpoints.gguf import load_lm

    lm, tok, _ = load_lm(root / "lm")
    model = SpeechBridge(SpeechBridgeConfig(whisper=TINY_WHISPER, lm=lm.cfg, qformer=QFormerConfig(
        text_input=False, lm_head=False, **TINY_QFORMER)))
    model.lm.load_state_dict(lm.state_dict())
    return model.eval(), tok


def word_scores(out: Path, model: SpeechBridge, tok: Tokenizer, template: str) -> tuple[int, dict]:
    """On the training clips: how many the bridge gives the right word as the likeliest transcript
    (chat_loss of each word; chance: 3 of 12), and each word's greedy answers (one answer for all if the
    bridge ignored the sound)."""
    from polymodal.data.speech import clip_name
    from polymodal.processing.audio import load_audio
    from polymodal.train.speech_bridge import clip_items

    chat = SpeechChat(model, tok, template)
    fmt = ChatFormat(tok, template, IM_END)
    word_of = {clip_name(w, v): w for w, v in clip_items(list(WORDS), 3, 0)}
    clips = sorted((out / "clips").glob("*.wav"))
    assert sorted(p.name for p in clips) == sorted(word_of)
    right, modes = 0, {w: Counter() for w in WORDS}
    for p in clips:
        states = SpeechFeatures(encode_clips(model, [load_audio(p)])[0][None])
        losses = []
        for w in WORDS:
            ids, spans = fmt.turns([("What did they say?", w)])
            targets = torch.full((1, len(ids)), -100)
            targets[0, spans[0][0]:] = torch.tensor(ids[spans[0][0]:])
            with torch.no_grad():
                losses.append(chat_loss(model, fmt.before, states, torch.tensor([ids]), targets).item())
        right += WORDS[losses.index(min(losses))] == word_of[p.name]
        modes[word_of[p.name]][chat.transcribe(p, max_new_tokens=3, min_new_tokens=1)] += 1
    return right, modes


def test_padding_is_masked_and_clips_encode_alone_as_in_a_batch(parts):
    from polymodal.processing.audio import load_audio

    torch.manual_seed(1)
    model, _ = tiny_bridge(parts)
    waves = [load_audio(parts / f"{w}.wav") for w in WORDS]
    together = encode_clips(model, waves + [waves[0][:8000]], batch_size=8)
    alone = [encode_clips(model, [w])[0] for w in waves]
    for a, b in zip(together, alone, strict=False):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    short = together[-1]  # half a second: two seconds of context, 25 positions a second after pooling
    assert short.shape == (50, 32) and speech_mel(waves[0][:8000], model.cfg).shape == (80, 200)
    longer = torch.cat([together[0], together[1]])
    padded = model.prompt(SpeechFeatures.pad([short, longer]))  # padding after the short clip is masked
    torch.testing.assert_close(padded[0], model.prompt(short[None])[0], atol=1e-5, rtol=1e-4)


def test_soft_prompt_sits_where_training_puts_it(parts):
    model, tok = tiny_bridge(parts)
    chat = SpeechChat(model, tok, CHATML)
    fmt = ChatFormat(tok, CHATML, IM_END)
    session = chat.chat()
    for question in ("", "What did they say?"):
        segments = session.segments([{"role": "user", "content": question}], [True])
        ids, spans = fmt.turns([(question, "apple")])
        assert segments[0] == fmt.before and segments[1] == ids[:spans[0][0]]
    # a follow-up row's second turn is what the session feeds after a spoken first turn
    ids, spans = fmt.turns([("", "an apple"), ("Why?", "it is red")])
    history = [{"role": "user", "content": ""}, {"role": "assistant", "content": "an apple"},
               {"role": "user", "content": "Why?"}]
    segments = session.segments(history, [True, False, False])
    assert segments[0] == fmt.before and segments[1] == ids[:spans[1][0]] and len(segments) == 2
    # what the session feeds the LLM equals the training row's [prefix; soft prompt; ids] embeddings
    wave = parts / "apple.wav"
    fed = {}
    import polymodal.tasks.speech_chat as sc

    real = sc.generate

    def spy(lm, **kwargs):
        fed["embeds"] = kwargs["inputs_embeds"]
        return real(lm, **kwargs)

    sc.generate = spy
    try:
        chat.ask(wave, "What did they say?", max_new_tokens=2)
    finally:
        sc.generate = real
    ids, spans = fmt.turns([("What did they say?", "x")])
    soft = chat.soft_prompt(wave)
    want = torch.cat([model.lm.embed(torch.tensor([fmt.before])), soft,
                      model.lm.embed(torch.tensor([ids[:spans[0][0]]]))], 1)
    torch.testing.assert_close(fed["embeds"], want)


def test_chat_loss_trains_the_bridge_only_and_teacher_answers_are_kept(parts, tmp_path):
    from polymodal.checkpoints.gguf import load_lm

    torch.manual_seed(2)
    model, tok = tiny_bridge(parts)
    lm, _, _ = load_lm(parts / "lm")
    prompts = [teacher_prompt(k, w, 0) for w in WORDS for k in ("spoken", "about")]
    answers = teacher_answers(prompts, lm, tok, CHATML, max_new_tokens=3, batch_size=3, cache=tmp_path / "a.jsonl")
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == len(prompts)
    assert teacher_answers(prompts, None, tok, CHATML, max_new_tokens=3, cache=tmp_path / "a.jsonl") == answers
    with open(tmp_path / "a.jsonl", "a", encoding="utf-8") as f:
        f.write('{"prompt": "apple", "ans')  # a line a kill cut short
    answers |= teacher_answers([teacher_prompt("followup", w, 0, answers) for w in WORDS], lm, tok, CHATML,
                               max_new_tokens=3, cache=tmp_path / "a.jsonl")
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert len(lines) == len(prompts) + 1 + len(WORDS) and lines[len(prompts)].endswith('"ans')
    session = SpeechChat(model, tok, CHATML).chat()  # the teacher's follow-up answer is the LLM's own, typed
    session.messages = teacher_prompt("followup", WORDS[0], 0, answers)[:2]
    session.prompts, session.sources = [None, None], [None, None]
    followup = teacher_prompt("followup", WORDS[0], 0, answers)[2]["content"]
    from polymodal.train.chat_rows import _whole_sentences

    said = session.send(followup, max_new_tokens=3)  # cut by the 3 tokens, or ended by the LLM itself
    assert answers[prompt_key(teacher_prompt("followup", WORDS[0], 0, answers))] in \
        (_whole_sentences(said, truncated=True), _whole_sentences(said, truncated=False))
    fmt = ChatFormat(tok, CHATML, IM_END)
    states = [torch.randn(n, 32) for n in (20, 35, 50)]
    batch = next(speech_batches(list(WORDS[:3]), states, answers, fmt, batch_size=4, seed=0,
                                kinds={"spoken": 1, "transcribe": 1, "about": 1, "followup": 1}))
    assert batch["features"].mask is not None and (batch["targets"] != -100).any(dim=1).all()
    for part in model.frozen:
        part.requires_grad_(False)
    loss = chat_loss(model, fmt.before, batch["features"], batch["input_ids"], batch["targets"])
    loss.backward()
    assert all(p.grad is not None and p.grad.any() for part in model.trained for p in part.parameters())


def test_train_speech_learns_the_words_and_saves_references(parts, tmp_path, monkeypatch):
    import polymodal.checkpoints.speech_io as speech_io

    trained, save = {}, speech_io.save_speech_bridge

    def keep(model, *args):  # the model as training left it, before it is saved
        trained["model"] = model
        return save(model, *args)

    monkeypatch.setattr(speech_io, "save_speech_bridge", keep)
    out = train_speech(recipe(parts), tmp_path / "bridge")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["stage"] == "train"]
    assert rows[0]["clips"] == 12 and len(losses) == 150
    assert sum(losses[-10:]) < 0.9 * sum(losses[:10]), (losses[:10], losses[-10:])

    # the frozen parts are bit-identical to their sources after training, and are referenced, not copied
    whisper = read_state_dict(parts / "whisper" / "model.safetensors")
    lm = read_state_dict(parts / "lm" / "model.safetensors")
    assert all(torch.equal(v, whisper[f"encoder.{k}"]) for k, v in trained["model"].encoder.state_dict().items())
    assert all(torch.equal(v, lm[k]) for k, v in trained["model"].lm.state_dict().items())
    saved = read_state_dict(out / "model.safetensors")
    assert saved and not any(k.startswith(("encoder.", "lm.")) for k in saved)
    model, tok, template = load_speech_bridge(out)
    assert all(torch.equal(v, whisper[f"encoder.{k}"]) for k, v in model.encoder.state_dict().items())
    assert all(torch.equal(v, lm[k]) for k, v in model.lm.state_dict().items())
    for name, v in trained["model"].state_dict().items():  # and the trained parts are what was trained
        assert torch.equal(v, model.state_dict()[name]), name

    # A random 2-layer LM cannot be made to spell, but the bridge must tell the words apart (see word_scores).
    right, modes = word_scores(out, model, tok, template)
    assert right >= 9, right
    assert len({counts.most_common(1)[0][0] for counts in modes.values()}) >= 3, modes

    # a Whisper that changed after training is refused with one clear line
    file = parts / "whisper" / "model.safetensors"
    original = file.read_bytes()
    try:
        state = read_state_dict(file)
        state["encoder.conv1.bias"] = state["encoder.conv1.bias"] + 1
        from safetensors.torch import save_file

        save_file(state, str(file))
        with pytest.raises(CheckpointError, match="another"):
            load_speech_bridge(out)
    finally:
        file.write_bytes(original)


def test_cli_train_resumes_and_ask_answers(parts, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from polymodal.cli import app

    r = recipe(parts, kinds={"spoken": 1.0, "transcribe": 1.0, "about": 1.0, "followup": 1.0}).to_dict()
    r["train"]["steps"] = 6
    r["save_every"] = 3
    (tmp_path / "recipe.json").write_text(json.dumps(r))
    out = tmp_path / "bridge"
    args = ["train", "speech", "--out", str(out), "--config", str(tmp_path / "recipe.json"), "--json"]
    result = CliRunner().invoke(app, args + ["--steps", "3"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["step"] == 3 and (out / "answers.jsonl").is_file()

    # a rerun resumes at step 3 and makes no data again (a line a kill cut short is passed over)
    with open(out / "answers.jsonl", "a", encoding="utf-8") as f:
        f.write('{"prompt": "What is an app')
    import polymodal.data.speech as data_speech
    import polymodal.tasks.speech_chat as sc

    monkeypatch.setattr(data_speech, "speak", lambda *a, **k: pytest.fail("spoken again"))
    monkeypatch.setattr(sc, "encode_clips", lambda *a, **k: pytest.fail("encoded again"))
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"stage": "resume", "step": 3} in rows and [r["step"] for r in rows if r["stage"] == "train"] == \
        [1, 2, 3, 4, 5, 6]
    monkeypatch.undo()

    ask = CliRunner().invoke(app, ["ask", "--audio", str(parts / "apple.wav"), "--speech-model", str(out),
                                   "What did they say?", "--max-new-tokens", "3", "--json"])
    assert ask.exit_code == 0, ask.output
    doc = json.loads(ask.stdout)
    assert doc["audio"] == str(parts / "apple.wav") and doc["question"] == "What did they say?"
    assert isinstance(doc["answer"], str)
    spoken = CliRunner().invoke(app, ["ask", "--audio", str(parts / "apple.wav"), "--speech-model", str(out),
                                      "--max-new-tokens", "3", "--json"])
    assert spoken.exit_code == 0 and json.loads(spoken.stdout)["question"] is None, spoken.output

    # bad audio: one clear line naming the file, exit code 2
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    fail = CliRunner().invoke(app, ["ask", "--audio", str(bad), "--speech-model", str(out), "--json"])
    assert fail.exit_code == 2 and fail.stdout == ""
    lines = fail.output.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and lines[0].startswith("error:"), fail.output
    with pytest.raises(AudioError, match="silent"):
        SpeechChat(*load_speech_bridge(out)).ask(torch.zeros(16000).numpy())

    # chat: a spoken first turn, then a typed one, through stdin
    chat = CliRunner().invoke(app, ["chat", "--audio", str(parts / "apple.wav"), "--speech-model", str(out),
                                    "--max-new-tokens", "2"], input="\nAnd why?\n/quit\n")
    assert chat.exit_code == 0, chat.output


def test_projector_bridge_learns_the_words_too(parts, tmp_path):
    from polymodal.models.speech_bridge import SpanProjector

    projector = SpanProjector(4, 6, 3)  # spans of a padded clip are its own: padding changes nothing
    states, mask = torch.randn(2, 9, 4), torch.arange(9)[None, :] < torch.tensor([[6], [9]])
    torch.testing.assert_close(projector(states, mask)[0], projector(states[:1, :6])[0])
    out = train_speech(recipe(parts, bridge="projector"), tmp_path / "bridge")
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()[1:]]
    assert sum(losses[-10:]) < 0.9 * sum(losses[:10]), (losses[:10], losses[-10:])
    model, tok, template = load_speech_bridge(out)
    assert model.cfg.bridge == "projector" and not hasattr(model, "qformer")
    right, _ = word_scores(out, model, tok, template)
    assert right >= 9, right
