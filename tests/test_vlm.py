"""The VLM task and its CLI on tiny random transformers BLIP-2 checkpoints saved locally: an OPT
one (no chat template, BLIP-2's "Question: ... Answer:" prompts) and a Llama one with a ChatML
template. Captions equal transformers' generate + decode; a chat turn with no image equals the
bare LLM; folder captioning resumes; chat memory, reset and history truncation; the commands."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import polymodal  # noqa: E402
from polymodal.checkpoints.vlm_io import load_vlm_checkpoint, save_vlm  # noqa: E402
from polymodal.cli import app  # noqa: E402
from polymodal.generation import generate  # noqa: E402
from polymodal.processing.chat import apply_chat_template, template_tokens  # noqa: E402
from polymodal.tasks.vlm import IMAGE_PLACEHOLDER, VLM  # noqa: E402

Q, VOCAB, SIZE = 4, 320, 32
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>"]  # ids 0..6
IMAGE_TOKEN, IM_END = 6, 5
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE,
              patch_size=8)
QFORMER = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
               max_position_embeddings=20)
LMS = {
    "opt": ("OPT", dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                        max_position_embeddings=64, bos_token_id=2, eos_token_id=2, pad_token_id=1)),
    "llama": ("Llama", dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=40, max_position_embeddings=96,
                            bos_token_id=0, eos_token_id=IM_END, pad_token_id=1)),
}
CORPUS = ["a photo of a cat on a red sofa", "a dog runs in the green park", "what is in the picture",
          "hello there, how are you today", "the answer is two apples and a banana"] * 4


def _tokenizer(lm: str):
    """A tiny byte-level BPE (GPT-2 style) as transformers saves it; OPT's prepends </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if lm == "opt":
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                           special_tokens=[("</s>", 2)])
    kw = dict(bos_token="</s>", eos_token="</s>") if lm == "opt" else dict(bos_token="<s>", eos_token="<|im_end|>")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                clean_up_tokenization_spaces=False, **kw)


@functools.cache
def checkpoint(lm: str, root: str):
    arch, kwargs = LMS[lm]
    torch.manual_seed(3)
    text = getattr(transformers, f"{arch}Config")(**kwargs)
    cfg = transformers.Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=text.to_dict(),
                                   num_query_tokens=Q, image_token_index=IMAGE_TOKEN)
    ref = transformers.Blip2ForConditionalGeneration(cfg)
    with torch.no_grad():
        for p in ref.parameters():  # noise, so a tiny LM's greedy output does not collapse into one token
            p.add_(torch.randn_like(p) * 0.3)
    ref.eval()
    d = Path(root) / lm
    ref.save_pretrained(d)
    tok = _tokenizer(lm)
    if lm == "llama":
        tok.chat_template = CHATML
    tok.save_pretrained(d)
    transformers.BlipImageProcessorPil(size={"height": SIZE, "width": SIZE}).save_pretrained(d)
    return ref, tok, d


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("vlm"))


def picture(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    for i in range(3):
        picture(d / f"img{i}.png", i)
    return d


def test_caption_equals_transformers(root, tmp_path):
    ref, tok, d = checkpoint("opt", root)
    vlm = polymodal.load_vlm(d)
    image = picture(tmp_path / "a.png", 7)
    px = transformers.BlipImageProcessorPil.from_pretrained(d)(Image.open(image), return_tensors="pt").pixel_values
    assert (vlm.pixels(image) - px).abs().max() <= 1e-5
    for beams, min_new in [(1, 0), (1, 6), (3, 0)]:
        opts = dict(max_new_tokens=8, min_new_tokens=min_new, num_beams=beams, do_sample=False)
        want = ref.generate(pixel_values=px, eos_token_id=2, pad_token_id=1, **opts)[0, Q + 1:]
        text = vlm.caption(image, max_new_tokens=8, min_new_tokens=min_new, num_beams=beams)
        assert text == tok.decode(want, skip_special_tokens=True).strip()
        assert text  # the tiny model says something, so equality means something


def test_caption_with_prompt_and_ask_equal_transformers(root, tmp_path):
    ref, tok, d = checkpoint("opt", root)
    vlm = polymodal.load_vlm(d)
    image = picture(tmp_path / "a.png", 8)
    px = vlm.pixels(image)
    for prompt, ours in [("a photo of", lambda: vlm.caption(image, prompt="a photo of", max_new_tokens=8)),
                         ("Question: what is in the picture? Answer:",
                          lambda: vlm.ask(image, "what is in the picture?", max_new_tokens=8))]:
        ids = tok(prompt, return_tensors="pt").input_ids  # </s> first, as OPT's tokenizer adds it
        full = torch.cat([torch.full((1, Q), IMAGE_TOKEN), ids], 1)
        want = ref.generate(pixel_values=px, input_ids=full, max_new_tokens=8, eos_token_id=2, pad_token_id=1)
        assert ours() == tok.decode(want[0, full.shape[1]:], skip_special_tokens=True).strip()


def test_chat_without_image_is_the_bare_llm(root):
    _, tok, d = checkpoint("llama", root)
    vlm = polymodal.load_vlm(d)
    assert vlm.chat_template == CHATML
    session = vlm.chat()
    answer = session.send("hello there", max_new_tokens=10)
    prompt = apply_chat_template(CHATML, [{"role": "user", "content": "hello there"}],
                                 **template_tokens(vlm.tokenizer))
    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    want = generate(vlm.model.lm, ids, max_new_tokens=10, eos_token_id=IM_END, pad_token_id=1)
    want = want.tokens[0, : int(want.lengths[0])].tolist()
    assert session.last_tokens == want and len(want) > 0
    assert answer == tok.decode(want, skip_special_tokens=True).strip()


def test_chat_template_places_the_image_in_the_first_user_turn(root, tmp_path):
    _, tok, d = checkpoint("llama", root)
    vlm = polymodal.load_vlm(d)
    image = picture(tmp_path / "a.png", 1)
    session = vlm.chat(image, max_new_tokens=5)
    first = session.send("what is in the picture")
    text = session.prompt_text("and the colour")
    assert text.startswith(f"<|im_start|>user\n{IMAGE_PLACEHOLDER}what is in the picture<|im_end|>\n")
    assert f"<|im_start|>assistant\n{first}<|im_end|>\n<|im_start|>user\nand the colour" in text
    assert text.count(IMAGE_PLACEHOLDER) == 1

    # the same answer from embeddings built by hand: [before; visual prompt; after]
    session.reset()
    prompt = session.prompt_text("what is in the picture")
    b, a = prompt.split(IMAGE_PLACEHOLDER)
    lm = vlm.model.lm
    embeds = torch.cat([lm.embed(torch.tensor([tok(b, add_special_tokens=False).input_ids])),
                        vlm.model.visual_prompt(vlm.pixels(image)),
                        lm.embed(torch.tensor([tok(a, add_special_tokens=False).input_ids]))], 1)
    want = generate(lm, inputs_embeds=embeds, max_new_tokens=5, eos_token_id=IM_END, pad_token_id=1)
    assert session.send("what is in the picture") == first
    assert session.last_tokens == want.tokens[0, : int(want.lengths[0])].tolist()


def test_chat_memory_reset_stream_and_save(root, tmp_path):
    _, _, d = checkpoint("opt", root)
    vlm = polymodal.load_vlm(d)
    session = vlm.chat(picture(tmp_path / "a.png", 2), max_new_tokens=4)
    pieces = []
    a1 = session.send("what is in the picture", stream=pieces.append)
    assert "".join(pieces) == a1
    assert session.prompt_text("and then").endswith(
        f"Question: what is in the picture Answer: {a1} Question: and then Answer:")
    session.send("and then")
    assert len(session.messages) == 4
    saved = json.loads(session.save(tmp_path / "t.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] * 2
    session.reset()
    assert session.messages == [] and session.prompt_text("hi") == f"{IMAGE_PLACEHOLDER}Question: hi Answer:"
    with pytest.raises(ValueError, match="empty"):
        session.send("   ")


def test_history_outgrowing_the_context_drops_oldest_turns(root, tmp_path):
    _, _, d = checkpoint("opt", root)  # context 64
    vlm = polymodal.load_vlm(d)
    notes = []
    session = vlm.chat(picture(tmp_path / "a.png", 3), on_note=notes.append, max_new_tokens=12)
    for _ in range(8):
        session.send("what is in the picture")
    assert session.dropped_turns > 0 and notes and "dropped" in notes[0]
    assert session.messages[0]["role"] == "user"
    with pytest.raises(ValueError, match="too long"):
        session.send("hello there " * 40)
    with pytest.raises(ValueError, match="too long"):
        vlm.caption(tmp_path / "a.png", prompt="hello there " * 40)


def test_caption_folder_resumes_and_skips_bad_images(root, folder, tmp_path):
    _, _, d = checkpoint("opt", root)
    vlm = polymodal.load_vlm(d)
    (folder / "broken.png").write_bytes(b"not a picture")
    out = tmp_path / "captions.jsonl"
    errors = []
    first = vlm.caption_folder(folder, out, on_error=lambda p, m: errors.append(p), max_new_tokens=5)
    assert first["captioned"] == 3 and [s["path"] for s in first["skipped"]] == [str(folder / "broken.png")]
    assert errors == [str(folder / "broken.png")]
    lines = out.read_text().splitlines()
    assert [json.loads(x)["path"] for x in lines] == [str(folder / f"img{i}.png") for i in range(3)]
    out.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # lose img1's line
    again = vlm.caption_folder(folder, out, max_new_tokens=5, progress=True)  # (a bar, transient)
    assert again["captioned"] == 1 and again["already_done"] == 2
    redone = json.loads(out.read_text().splitlines()[-1])
    assert redone == json.loads(lines[1])


@pytest.mark.parametrize("lm", ["opt", "llama"])
def test_batched_asks_and_captions_equal_one_by_one(root, tmp_path, lm):
    """ask_many / caption_many left-pad prompts of different lengths into one batch: the answers
    are those of ask / caption, for an OPT BLIP-2 (plain prompts) and a chat-template LLM."""
    _, _, d = checkpoint(lm, root)
    vlm = polymodal.load_vlm(d)
    images = [picture(tmp_path / f"{i}.png", 20 + i) for i in range(4)] + [None]
    questions = ["what is it?", "what colour is the thing on the left of the picture?", "why?",
                 "is there anything at all in this picture, or is it empty?", "say something"]
    one = [vlm.ask(im, q, max_new_tokens=6) for im, q in zip(images, questions, strict=True)]
    assert len(set(one)) > 1  # the tiny model's answers differ, so equality means something
    assert vlm.ask_many(images, questions, batch_size=3, max_new_tokens=6) == one
    assert vlm.ask_many(images, questions, max_new_tokens=6, num_beams=2) == [
        vlm.ask(im, q, max_new_tokens=6, num_beams=2) for im, q in zip(images, questions, strict=True)]
    assert vlm.caption_many(images[:4], batch_size=4, max_new_tokens=6) == [
        vlm.caption(im, max_new_tokens=6) for im in images[:4]]
    with pytest.raises(ValueError, match="question is empty"):
        vlm.ask_many(images[:2], ["fine", " "])
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        vlm.ask_many(images[:2], ["fine"])


def test_own_format_round_trip(root, tmp_path):
    _, _, d = checkpoint("llama", root)
    model, tok, template, transform = load_vlm_checkpoint(d)
    save_vlm(model, tmp_path / "own", tok, template)
    vlm, again = VLM(model, tok, template, transform), polymodal.load_vlm(tmp_path / "own")
    assert again.chat_template == template and again.image_transform == transform
    image = picture(tmp_path / "a.png", 4)
    assert again.ask(image, "what is this", max_new_tokens=6) == vlm.ask(image, "what is this", max_new_tokens=6)


runner = CliRunner()


def test_cli_caption_ask_chat(root, folder, tmp_path):
    _, _, d = checkpoint("opt", root)
    vlm = polymodal.load_vlm(d)
    image = folder / "img0.png"
    r = runner.invoke(app, ["caption", str(image), "--model", str(d), "--max-new-tokens", "5", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"image": str(image), "caption": vlm.caption(image, max_new_tokens=5)}

    out = tmp_path / "c.jsonl"
    r = runner.invoke(app, ["caption", str(folder), "-m", str(d), "--out", str(out), "--max-new-tokens", "5"])
    assert r.exit_code == 0 and "3 captioned" in r.stdout and len(out.read_text().splitlines()) == 3
    r = runner.invoke(app, ["caption", str(folder), "-m", str(d), "--out", str(out), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["already_done"] == 3

    r = runner.invoke(app, ["ask", str(image), "what is in the picture", "-m", str(d), "--max-new-tokens", "5"])
    assert r.exit_code == 0 and r.stdout.strip() == vlm.ask(image, "what is in the picture", max_new_tokens=5)

    script = f"what is in the picture\n/image {folder / 'img1.png'}\nhello there\n/save {tmp_path / 't.json'}\n" \
             "/reset\n/image nowhere.png\n/quit\nnever read\n"
    r = runner.invoke(app, ["chat", str(image), "-m", str(d), "--max-new-tokens", "5"], input=script)
    assert r.exit_code == 0, r.output
    answers = r.stdout.splitlines()
    assert answers[0] == vlm.ask(image, "what is in the picture", max_new_tokens=5)
    assert answers[1] == vlm.ask(folder / "img1.png", "hello there", max_new_tokens=5)
    assert len(json.loads((tmp_path / "t.json").read_text())["messages"]) == 2
    assert "error: nowhere.png" in r.stderr


def test_cli_bad_inputs(root, folder):
    _, _, d = checkpoint("opt", root)
    for args in (["caption", "missing.png", "-m", str(d)], ["ask", "missing.png", "what", "-m", str(d)],
                 ["ask", str(folder / "img0.png"), "  ", "-m", str(d)],
                 ["caption", str(folder / "img0.png"), "-m", str(folder)]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["ask", str(folder / "img0.png"), "what", "-m", str(folder / "nowhere")])
    assert r.exit_code == 2 and r.stderr.startswith("error:")  # a --model that is not there
