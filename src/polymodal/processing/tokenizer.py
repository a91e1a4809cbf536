"""Text tokenizers on the `tokenizers` library: CLIP's byte-level BPE and BERT's WordPiece.

CLIP (Radford et al. 2021, OpenAI `simple_tokenizer.py`): NFC, whitespace runs to one space,
lowercase; split into contractions, letter runs, single digits and symbol runs; byte-level BPE
whose word-final pieces end in `</w>`; `<|startoftext|> ... <|endoftext|>`, at most 77 ids.
The ids equal transformers' `CLIPTokenizer` (checked in `tests/test_tokenizer.py`).

BERT (Devlin et al. 2018): BertNormalizer, BertPreTokenizer, WordPiece with `##` continuations,
`[CLS] ... [SEP]`.

Byte-level BPE ("bpe": GPT-2, Llama 3, SmolLM, Qwen2 vocabularies, e.g. from a GGUF file): a split
regex, bytes spelled as printable characters, BPE; special tokens stay whole; a start (or end) token
only where the vocabulary asks for one; a text longer than the context is cut there, with no end
token forced in; decoding gives the text back byte for byte.

Truncation keeps the end token last. Texts far longer than the context are cut (before a space)
to a character budget before tokenizing, so 10 MB of text costs what a paragraph does.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE, WordPiece

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer: its special tokens, English contractions, letter runs, one digit, symbol runs.
CLIP_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CHARS_PER_TOKEN = 40  # character budget per context position before tokenizing a long text
CONFIG_FILE = "tokenizer_config.json"
# Runs of whitespace that both pipelines read as one space. Not Python's `\s` (CLIP reads \x1c-\x1f
# as symbols) nor \x0b \x0c \x85 (BERT deletes these control characters).
WHITESPACE_RUN = re.compile("[\t\n\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]{2,}")
FIELDS = ("kind", "context_length", "pad_id", "bos_id", "eos_id")  # what tokenizer_config.json holds
KINDS = ("clip", "wordpiece", "bpe")


class Tokenizer:
    """A `tokenizers.Tokenizer` with a context length and the ids a text model needs."""

    def __init__(
        self,
        backend: Backend,
        kind: Literal["clip", "wordpiece", "bpe"],
        context_length: int,
        pad_id: int,
        bos_id: int | None = None,
        eos_id: int | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        backend.no_truncation()  # we truncate ourselves, keeping the end token last
        backend.no_padding()
        self.backend, self.kind, self.context_length = backend, kind, context_length
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, context_length={self.context_length}, "
            f"pad_id={self.pad_id}, bos_id={self.bos_id}, eos_id={self.eos_id})"
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # --- encoding ---------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """The ids of one text, with start/end tokens, truncated to `context_length`."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str], context_length: int | None = None) -> list[list[int]]:
        """The ids of each text (see `encode`), tokenized in parallel by the backend."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"Tokenizer.encode_batch expects a list of str, got {type(texts).__name__}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"Tokenizer.encode_batch: texts[{i}] is a {type(text).__name__}, not a str")
        length = context_length or self.context_length
        if self.kind == "bpe":  # every byte counts, whitespace runs too: no early cut
            return [enc.ids[:length] for enc in self.backend.encode_batch(list(texts))]
        budget = max(length, 32) * CHARS_PER_TOKEN  # > 2 x 100: a longer WordPiece word is one [UNK]
        cuts = [_cut(text, budget) for text in texts]
        encodings = self.backend.encode_batch([piece for piece, _ in cuts])
        out = []
        for text, (piece, exact), enc in zip(texts, cuts, encodings, strict=True):
            ids = enc.ids
            if len(piece) < len(text) and not (exact and len(ids) > length):
                ids = self._encode_long(text, length, budget)
            out.append(self._truncate(ids, length))
        return out

    def _encode_long(self, text: str, length: int, budget: int) -> list[int]:
        """Ids of a text whose first cut held too few tokens or split a word: grow the cut until it
        holds more than `length` tokens and (if it split a word) a cut twice as long agrees."""
        text = WHITESPACE_RUN.sub(" ", text)  # same ids; megabytes of blanks are cheap to cut
        keep = length - (self.eos_id is not None)
        while budget < len(text):
            piece, exact = _cut(text, budget)
            ids = self.backend.encode(piece).ids
            if len(ids) > length and (
                exact or ids[:keep] == self.backend.encode(text[: 2 * budget]).ids[:keep]
            ):
                return ids
            budget *= 4
        return self.backend.encode(text).ids

    def _truncate(self, ids: list[int], length: int) -> list[int]:
        if len(ids) <= length:
            return ids
        return ids[:length] if self.eos_id is None else ids[: length - 1] + [self.eos_id]

    def __call__(self, texts: str | list[str], context_length: int | None = None,
                 padding_side: Literal["right", "left"] = "right") -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask`, LongTensors (N, L): L is the longest text in the batch,
        or `context_length` when given (texts are then truncated to it too). A decoder LM's prompts
        are padded on the left (`padding_side="left"`), so every row ends at the last column."""
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        batch = self.encode_batch([texts] if isinstance(texts, str) else texts, context_length)
        width = context_length or max((len(ids) for ids in batch), default=0)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (N, L)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (N, L)
        for i, ids in enumerate(batch):
            cols = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
            input_ids[i, cols] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, cols] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of `ids` (a list or 1-D tensor), special tokens and padding skipped unless
        `skip_special_tokens=False`. CLIP and WordPiece text is stripped; byte-level BPE text comes
        back exactly."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return text if self.kind == "bpe" else text.strip()

    # --- files ------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` (the backend) and `tokenizer_config.json` (our fields)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {name: getattr(self, name) for name in FIELDS}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read a directory written by `save`."""
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file() or not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{directory}: no tokenizer.json + {CONFIG_FILE} written by Tokenizer.save"
            )
        config = _read_json(directory / CONFIG_FILE)
        missing = [name for name in FIELDS if name not in config]
        if missing:
            raise ValueError(f"{directory}: {CONFIG_FILE} lacks {', '.join(missing)}")
        backend = Backend.from_file(str(directory / "tokenizer.json"))
        return cls(backend, **{name: config[name] for name in FIELDS})


def _cut(text: str, budget: int) -> tuple[str, bool]:
    """The start of `text` to about `budget` characters, and whether the cut is exact: made before a
    space, so every word before it tokenizes as in the whole text."""
    if len(text) <= budget:
        return text, True
    space = max(text.rfind(" ", budget // 2, budget), text.rfind("\n", budget // 2, budget))
    return (text[:space], True) if space >= 0 else (text[:budget], False)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# --- CLIP -----------------------------------------------------------------------------------------


def clip_tokenizer(
    vocab_path: str | Path | None = None,
    merges_path: str | Path | None = None,
    context_length: int = 77,
    pad_id: int | None = None,
) -> Tokenizer:
    """CLIP's BPE tokenizer from `vocab.json` + `merges.txt` (default: the packaged OpenAI vocabulary).

    pad_id: the id batches are padded with (default `<|endoftext|>`, as transformers; OpenCLIP pads with 0).
    """
    tokenizer = _clip(*_read_bpe(vocab_path, merges_path), context_length)
    if pad_id is not None:
        tokenizer.pad_id = pad_id
    return tokenizer


def _read_bpe(vocab_path, merges_path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    assets = resources.files("polymodal") / "assets" / "clip-bpe"
    vocab_file = Path(vocab_path) if vocab_path is not None else assets / "vocab.json"
    merges_file = Path(merges_path) if merges_path is not None else assets / "merges.txt"
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return vocab, [tuple(line.split(" ")) for line in lines if line]


def _clip(
    vocab: dict[str, int], merges: list[tuple[str, str]], context_length: int, pad: str = EOS
) -> Tokenizer:
    for token in (BOS, EOS, pad):
        if token not in vocab:
            raise ValueError(f"CLIP vocabulary has no {token!r}")
    model = BPE(
        vocab, merges, unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False
    )
    backend = Backend(model)
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    # Word-final pieces end in `</w>`: it becomes the space between words.
    backend.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Replace("</w>", " "), decoders.Strip(" ", 0, 1)]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS)])
    bos, eos = vocab[BOS], vocab[EOS]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)]
    )
    return Tokenizer(backend, "clip", context_length, pad_id=vocab[pad], bos_id=bos, eos_id=eos)


# --- WordPiece ------------------------------------------------------------------------------------


def wordpiece_tokenizer(path: str | Path, context_length: int = 512, lowercase: bool = True) -> Tokenizer:
    """A BERT-style WordPiece tokenizer from a `tokenizer.json` (used as it is) or a `vocab.txt`
    (BertNormalizer, BertPreTokenizer, `##` continuations, `[CLS] ... [SEP]`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no WordPiece vocabulary at {path}")
    if path.suffix == ".json":
        backend = Backend.from_file(str(path))
        if not isinstance(backend.model, WordPiece):
            raise ValueError(f"{path}: a {type(backend.model).__name__} model, not WordPiece")
        vocab = backend.get_vocab()
    else:
        with open(path, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        backend = Backend(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in BERT_SPECIALS if t in vocab]
        )
    missing = [t for t in ("[PAD]", "[CLS]", "[SEP]") if t not in vocab]
    if missing:
        raise ValueError(f"{path}: the vocabulary has no {', '.join(missing)}")
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    if backend.post_processor is None:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    return Tokenizer(backend, "wordpiece", context_length, pad_id=vocab["[PAD]"], bos_id=cls, eos_id=sep)


# --- byte-level BPE -----------------------------------------------------------------------------------


def bpe_tokenizer(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    *,
    split: str | None = None,
    individual_digits: bool = False,
    specials: tuple[str, ...] = (),
    added: tuple[str, ...] = (),
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    add_bos: bool = False,
    add_eos: bool = False,
    context_length: int = 2048,
) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2, Llama 3, SmolLM, Qwen2) from a vocabulary spelled in the
    byte alphabet and its merges, best first.

    split: the regex that cuts text into pre-tokens, each kept whole; None: GPT-2's own.
    individual_digits: cut every digit out first (StarCoder and SmolLM vocabularies).
    specials: tokens matched whole anywhere in a text and skipped by `decode` (`<|im_start|>`);
    added: tokens matched whole but decoded as text. add_bos / add_eos: wrap every text in the
    start / end token. pad_id: default the end token, else 0.
    """
    backend = Backend(BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if individual_digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    wrap = {"bos": (bos_id, add_bos), "eos": (eos_id, add_eos)}
    for name, (i, on) in wrap.items():
        if on and i is None:
            raise ValueError(f"add_{name} is set but there is no {name} id")
    ends = {name: backend.id_to_token(i) for name, (i, on) in wrap.items() if on}
    first, last = [ends["bos"]] if "bos" in ends else [], [ends["eos"]] if "eos" in ends else []
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join([*first, "$A", *last]),
        pair=" ".join([*first, "$A", *last, *first, "$B:1", *last]),
        special_tokens=[(token, backend.token_to_id(token)) for token in ends.values()],
    )
    pad = pad_id if pad_id is not None else eos_id if eos_id is not None else 0
    return Tokenizer(backend, "bpe", context_length, pad_id=pad, bos_id=bos_id, eos_id=eos_id)


# --- directories ----------------------------------------------------------------------------------


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer in a directory: one written by `Tokenizer.save`, a transformers CLIP directory
    (`tokenizer.json` with a BPE model, or `vocab.json` + `merges.txt`), or a BERT one
    (`tokenizer.json` with a WordPiece model, or `vocab.txt`). `model_max_length` and `pad_token`
    come from `tokenizer_config.json` / `special_tokens_map.json` when present."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"no tokenizer directory at {directory}")
    config = _read_json(directory / "special_tokens_map.json") | _read_json(directory / CONFIG_FILE)
    if "kind" in config:
        return Tokenizer.load(directory)
    length = config.get("model_max_length")  # transformers writes 1e30 for "no limit"
    if not (isinstance(length, int) and 2 <= length <= 1_000_000):
        length = None
    pad = config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    files = {name: directory / name for name in ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt")}
    if files["tokenizer.json"].is_file():
        model = _read_json(files["tokenizer.json"]).get("model", {})
        model_type = model.get("type") or ("BPE" if "merges" in model else "WordPiece")
        if model_type == "WordPiece":
            return wordpiece_tokenizer(files["tokenizer.json"], length or 512)
        if model_type != "BPE" or model.get("end_of_word_suffix") != "</w>":
            raise ValueError(
                f"{directory}: tokenizer.json holds a {model_type} model, neither CLIP BPE nor WordPiece"
            )
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return _clip(model["vocab"], merges, length or 77, pad or EOS)
    if files["vocab.json"].is_file() and files["merges.txt"].is_file():
        return _clip(*_read_bpe(files["vocab.json"], files["merges.txt"]), length or 77, pad or EOS)
    if files["vocab.txt"].is_file():
        return wordpiece_tokenizer(
            files["vocab.txt"], length or 512, lowercase=config.get("do_lower_case", True)
        )
    raise FileNotFoundError(
        f"{directory}: no tokenizer found (tokenizer.json, vocab.json + merges.txt, or vocab.txt)"
    )
