"""Tokenizers: ids equal transformers' CLIPTokenizer / BertTokenizer on varied text, truncation
keeps the end token, long texts are cut early without changing the result, files round-trip."""

from __future__ import annotations

import json
import random
import shutil
import unicodedata
from importlib import resources

import pytest
import torch

from polymodal.processing.tokenizer import (
    Tokenizer,
    clip_tokenizer,
    load_tokenizer,
    wordpiece_tokenizer,
)

transformers = pytest.importorskip("transformers")

ASSETS = resources.files("polymodal") / "assets" / "clip-bpe"

# fmt: off
PROSE = (
    "a photo of the cat dog on bench with two people riding bikes down street next to tall building "
    "man woman child playing frisbee in park sunset over ocean red car parked near blue house bowl "
    "fruit table kitchen oven plate pizza cheese tomato small bird sitting branch tree snow covered "
    "mountain river flowing through forest group friends smiling camera black white vintage train "
    "station airplane flying sky clouds laptop desk coffee cup book shelf beautiful colorful painting"
)
WORDS = PROSE.split()
CONTRACTIONS = ["it's", "don't", "we're", "I've", "I'm", "you'll", "she'd", "IT'S", "DON'T", "dog'S",
                "WE'RE", "They'Ve", "I'LL", "He'D", "'s", "'t", "rock 'n' roll", "o'clock", "''"]
NUMBERS = ["1,234", "3.14159", "1e10", "-42", "$1,000.50", "50%", "2024-01-15", "10:30pm", "007",
           "1/2", "½", "²", "Ⅻ", "١٢٣", "٣.١٤", "①"]
PUNCT = ["!!!", "?!", "...", "---", "***", "''", '""', "(", ")", "[x]", "{y}", "…", "—", "«»", "¿qué?",
         ";-)", ":)", "#", "@", "~~", "\\", "/", "|", "^_^", "&&", "<>", "、", "。"]
ACCENTS = ["café", "naïve", "Zürich", "façade", "résumé", "São Paulo", "Ångström", "crème brûlée",
           "piñata", "İstanbul", "straße", "STRASSE", "ΣΊΣΥΦΟΣ", "ὈΔΥΣΣΕΎΣ", "Dvořák", "Łódź", "ǅemal", "ﬁne"]
SCRIPTS = ["我爱北京天安门", "東京タワーの夜景", "こんにちは世界", "한국어 텍스트입니다", "Привет, мир!",
           "МОСКВА Кремль", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีครับ", "Γειά σου Κόσμε",
           "ሰላም", "ᚠᚢᚦ", "𝕳𝖊𝖑𝖑𝖔", "ｆｕｌｌｗｉｄｔｈ"]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸", "🇯🇵", "❤️", "🔥🔥🔥", "1️⃣", "🧑🏿‍💻", "👩‍❤️‍💋‍👨",
         "🐈‍⬛", "✌🏻", "🤷‍♀️"]
COMBINING = ["e\u0301", "a\u0308", "n\u0303", "Z\u0335a\u0336l\u0337g\u0338o\u0334", "\u0301start",
             "i\u0307", "A\u030a", "\u1100\u1161\u11a8", "q\u0323\u0307"]
MARKUP = ["<b>bold</b>", "&amp;", "&lt;3", '<a href="https://x.com">link</a>', "<br/>", "&#39;",
          "<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|endoftext", "[MASK]", "[cls]"]
WEB = ["https://www.example.com/path?q=1&x=y#frag", "user@example.com", "@user", "#hashtag",
       "www.test.org", "C:\\Users\\me", "snake_case_name", "camelCaseName", "file.tar.gz"]
ODD = ["\u200b", "\u200d", "\ufeff", "\u00ad", "\x00", "\x1c", "\x7f", "\ufffd", "\u2028", "\x85", "\x0b\x0c"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", " \n\n ", "\u00a0", "\u3000", "\u2003", "\t\t  ", ""]
POOLS = [WORDS, CONTRACTIONS, NUMBERS, PUNCT, ACCENTS, SCRIPTS, EMOJI, COMBINING, MARKUP, WEB, ODD]
WEIGHTS = [30, 6, 6, 6, 6, 6, 5, 3, 3, 3, 2]
CAPTIONS = ["a photo of a cat", "A PHOTO OF A DOG", "Two people riding bikes down a street.",
            "a red car parked next to a blue house", "", " ", "\n", "Hello, World!",
            "There's a café in Zürich; it's naïve to think we'll find it.", "a" * 300]
# fmt: on


def _mixed_case(rng: random.Random, s: str) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c for c in s)


def make_corpus(n: int, seed: int = 0) -> list[str]:
    """`n` varied strings: captions, then random mixes of words, symbols, scripts and whitespace."""
    rng = random.Random(seed)
    corpus = list(CAPTIONS)
    while len(corpus) < n:
        long = rng.random() < 0.1
        parts = []
        for _ in range(rng.randint(60, 200) if long else rng.randint(1, 12)):
            parts.append(rng.choice(rng.choices(POOLS, WEIGHTS)[0]))
            parts.append(rng.choice(SPACES) if rng.random() < 0.3 else " ")
        text = "".join(parts)
        case = rng.random()
        if case < 0.15:
            text = text.upper()
        elif case < 0.3:
            text = _mixed_case(rng, text)
        elif case < 0.4:
            text = text.capitalize()
        if rng.random() < 0.15:
            text = unicodedata.normalize(rng.choice(["NFD", "NFC", "NFKD"]), text)
        if rng.random() < 0.2:
            text = rng.choice(SPACES) + text + rng.choice(SPACES)
        corpus.append(text)
    return corpus


CORPUS = make_corpus(1500)


def _mismatches(texts, ours, ref):
    bad = [(t, a, b) for t, a, b in zip(texts, ours, ref, strict=True) if a != b]
    return f"{len(bad)} of {len(texts)} differ; first: {bad[:3]!r}"


# --- CLIP -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip-bpe")
    for name in ("vocab.json", "merges.txt"):
        (d / name).write_bytes((ASSETS / name).read_bytes())
    return d


@pytest.fixture(scope="module")
def hf_clip(bpe_dir):
    return transformers.CLIPTokenizer.from_pretrained(str(bpe_dir))


@pytest.fixture(scope="module")
def clip():
    return clip_tokenizer()


def test_clip_known_ids(clip):
    assert clip.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip.encode("") == [49406, 49407]
    assert (clip.kind, clip.context_length, clip.pad_id) == ("clip", 77, 49407)
    assert (clip.bos_id, clip.eos_id) == (49406, 49407)
    assert clip.vocab_size == 49408


def test_clip_matches_transformers(clip, hf_clip):
    assert len(CORPUS) >= 1000
    ref = hf_clip(CORPUS, truncation=True, max_length=77)["input_ids"]
    ours = clip.encode_batch(CORPUS)
    assert ours == ref, _mismatches(CORPUS, ours, ref)
    assert any(len(ids) == 77 for ids in ours), "the corpus must exercise truncation"
    assert all(ids[0] == 49406 and ids[-1] == 49407 and len(ids) <= 77 for ids in ours)
    assert [clip.encode(t) for t in CORPUS[:100]] == ref[:100]


def test_clip_fast_alias_matches(clip, bpe_dir):
    fast = transformers.CLIPTokenizerFast.from_pretrained(str(bpe_dir))
    ref = fast(CORPUS[:300], truncation=True, max_length=77)["input_ids"]
    assert clip.encode_batch(CORPUS[:300]) == ref


def test_call_pads_to_longest(clip, hf_clip):
    texts = CORPUS[:40]
    ours = clip(texts)
    ref = hf_clip(texts, truncation=True, max_length=77, padding=True, return_tensors="pt")
    assert ours["input_ids"].dtype == torch.long and ours["attention_mask"].dtype == torch.long
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])

    short = clip(["a cat", "a photo of a cat"])
    assert short["input_ids"].shape == (2, 7)
    assert short["input_ids"][0].tolist() == [49406, 320, 2368, 49407, 49407, 49407, 49407]
    assert short["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0]
    fixed = clip("a cat", context_length=77)
    assert fixed["input_ids"].shape == (1, 77) and fixed["attention_mask"].sum() == 4
    cut = clip(" ".join(WORDS), context_length=8)["input_ids"]
    assert cut.shape == (1, 8) and cut[0, -1] == 49407
    assert clip([])["input_ids"].shape == (0, 0)


def test_clip_decode_matches_transformers(clip, hf_clip):
    sentences = [
        "a photo of a cat",
        "Hello, World! It's a dog's life.",
        "Two people riding bikes down a street.",
        "I can't believe it's 10:30 already?!",
        "The QUICK brown fox (jumps) over 3 lazy dogs...",
    ]
    for s in sentences:
        ids = clip.encode(s)
        assert clip.decode(ids) == hf_clip.decode(ids, skip_special_tokens=True)
        assert clip.decode(torch.tensor(ids)) == clip.decode(ids)
    assert clip.decode(clip("a cat", context_length=10)["input_ids"][0]) == "a cat"


def test_long_text_cut_equals_full_truncation(clip, hf_clip):
    rng = random.Random(1)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))).capitalize() + ". "  # noqa: E731
    texts = [
        "".join(sentence() for _ in range(2000)),  # ~140k characters of prose
        " " * 50_000 + "a photo of a cat " * 100,  # whitespace first: the cut must grow
        ("word" + " \t\n" * 500) * 200,
        "我爱北京天安门" * 10_000,  # no spaces: one long letter run
        "a" * 100_000,
        "1234567890" * 10_000,
        "!?.," * 20_000,
        "naïve café " * 5000 + "ΣΊΣΥΦΟΣ" * 3000,
        ("e\u0301" * 1600) + " tail",
        " " * 20_000 + "a\x1c\x1db \x0b\x0c\u3000\u3000" * 200,  # which blanks the long path may collapse
    ]
    ours = clip.encode_batch(texts)
    ref = hf_clip(texts, truncation=True, max_length=77)["input_ids"]
    assert ours == ref, _mismatches(texts, ours, ref)
    assert all(len(ids) == 77 and ids[-1] == 49407 for ids in ours)


def test_ten_megabytes(clip):
    rng = random.Random(2)
    text = " ".join(rng.choice(WORDS) for _ in range(2_000_000))
    assert len(text) > 10_000_000
    ids = clip.encode(text)
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
    assert ids == clip.encode(text[:5000])
    assert len(clip.encode("我" * 10_000_000)) == 77


def test_type_errors(clip):
    with pytest.raises(TypeError, match="expects a str"):
        clip.encode(None)
    with pytest.raises(TypeError, match="bytes"):
        clip.encode(b"a cat")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        clip.encode_batch(["a cat", 3])
    with pytest.raises(TypeError, match="list of str"):
        clip.encode_batch("a cat")


# --- files ----------------------------------------------------------------------------------------


def test_save_load_round_trip(clip, tmp_path):
    clip.save(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config == {"kind": "clip", "context_length": 77, "pad_id": 49407, "bos_id": 49406, "eos_id": 49407}
    for loaded in (Tokenizer.load(tmp_path / "tok"), load_tokenizer(tmp_path / "tok")):
        assert loaded.encode_batch(CORPUS[:300]) == clip.encode_batch(CORPUS[:300])
        assert loaded.decode(clip.encode("Hello, World!")) == "hello , world !"
        assert (loaded.kind, loaded.pad_id, loaded.context_length) == ("clip", 49407, 77)


def test_load_transformers_clip_dir(bpe_dir, tmp_path):
    hf = transformers.CLIPTokenizer.from_pretrained(str(bpe_dir), model_max_length=77)
    hf.save_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "clip" and tok.context_length == 77 and tok.pad_id == hf.pad_token_id
    assert tok.encode_batch(CORPUS) == hf(CORPUS, truncation=True)["input_ids"]


def test_load_vocab_merges_dir_reads_config(bpe_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(bpe_dir / name, tmp_path / name)
    assert load_tokenizer(tmp_path).context_length == 77  # no config: CLIP's default
    config = {"model_max_length": 32, "pad_token": {"content": "!", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert (tok.context_length, tok.pad_id) == (32, 0)  # OpenCLIP-style "!" padding
    assert tok.encode("hello!") == clip_tokenizer().encode("hello!")  # padding does not change encoding
    assert len(tok.encode(" ".join(WORDS))) == 32


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(ValueError, match="Unigram"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="Tokenizer.save"):
        Tokenizer.load(tmp_path)


# --- WordPiece ------------------------------------------------------------------------------------

# fmt: off
BERT_WORDS = sorted({w.lower() for w in WORDS} | {"the", "un", "##believ", "##able", "play", "##ing", "##ed",
                     "##s", "##er", "##ly", "cafe", "naive", "zurich", "hello", "world", "it", "don", "t",
                     "we", "re", "http", "www", "com", "example", "我", "爱", "北", "京", "привет", "мир"})
# fmt: on


@pytest.fixture(scope="module")
def bert_vocab(tmp_path_factory):
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    tokens = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *chars,
        *[f"##{c}" for c in chars[:36]],
        *BERT_WORDS,
    ]
    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def hf_bert(bert_vocab):
    return transformers.BertTokenizer.from_pretrained(str(bert_vocab))


def test_wordpiece_matches_transformers(bert_vocab, hf_bert):
    tok = wordpiece_tokenizer(bert_vocab / "vocab.txt", context_length=48)
    texts = make_corpus(250, seed=3) + ["un believable playing unbelievable", "x" * 150, "[MASK] a [mask]"]
    texts += [
        PROSE * 300,
        " " * 30_000 + PROSE,
        "y" * 5000 + " " + PROSE,
        " " * 30_000 + "a\x0b\x0bb " * 100,
        "z" * 1950 + " a b",
    ]
    ours = tok.encode_batch(texts)
    ref = hf_bert(texts, truncation=True, max_length=48)["input_ids"]
    assert ours == ref, _mismatches(texts, ours, ref)
    assert any(len(ids) == 48 for ids in ours)
    assert (tok.kind, tok.pad_id, tok.bos_id, tok.eos_id) == ("wordpiece", 0, 2, 3)
    assert tok.encode("") == [2, 3]
    assert tok.decode(tok.encode("Hello World playing")) == hf_bert.decode(
        hf_bert("Hello World playing")["input_ids"], skip_special_tokens=True
    )


def test_wordpiece_directories(bert_vocab, hf_bert, tmp_path):
    texts = make_corpus(100, seed=4)
    ref = hf_bert(texts, truncation=True, max_length=512)["input_ids"]
    assert load_tokenizer(bert_vocab).encode_batch(texts) == ref  # vocab.txt only
    hf_bert.save_pretrained(str(tmp_path / "hf"))
    tok = load_tokenizer(tmp_path / "hf")  # tokenizer.json with a WordPiece model
    assert tok.kind == "wordpiece" and tok.encode_batch(texts) == ref
    tok.save(tmp_path / "ours")
    assert load_tokenizer(tmp_path / "ours").encode_batch(texts) == ref
    clip_tokenizer().backend.save(str(tmp_path / "bpe.json"))
    with pytest.raises(ValueError, match="not WordPiece"):
        wordpiece_tokenizer(tmp_path / "bpe.json")
