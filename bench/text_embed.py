"""Text embedding of many captions of real lengths, polymodal against transformers, same weights.

    .venv/bin/python bench/text_embed.py [--captions 10000] [--batch 32] [--repeats 1]

The captions are English words from CLIP's vocabulary, with lengths drawn like alt-text and
COCO captions: log-normal with a median of 12 tokens, cut to 3..77 (start and end tokens
included), so most are short and a few fill the context. polymodal embeds them with
`Embedder.encode_text` (tokenising included; batches sorted by length, results in input
order); transformers gets the same token ids in input order, each batch padded to its
longest caption (a processor's `padding=True`), and runs `get_text_features`. Embeddings are
checked equal, then the two are timed alternately and the ratio printed.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import torch
from timing import timed_pair


def make_captions(n: int, seed: int = 0) -> list[str]:
    """n captions whose token counts (with start and end) are log-normal, median 12, in 3..77."""
    from importlib import resources

    vocab = json.loads((resources.files("polymodal.assets") / "clip-bpe" / "vocab.json").read_text())
    words = sorted(w[:-4] for w in vocab if re.fullmatch(r"[a-z]{3,9}</w>", w))  # one token each
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(12), 0.6, n)), 3, 77).astype(int) - 2
    return [" ".join(rng.choice(words, size=k)) for k in lengths]


def main() -> None:
    import transformers

    from polymodal.checkpoints import hf_clip
    from polymodal.checkpoints.state import load_exact
    from polymodal.models.clip import CLIP
    from polymodal.processing.tokenizer import clip_tokenizer
    from polymodal.tasks.embed import Embedder, _token_budget_ends

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--captions", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    torch.manual_seed(0)
    ref = transformers.CLIPModel(transformers.CLIPConfig()).eval()  # ViT-B/32's text tower: 12 x 512
    cfg = hf_clip.config_from_hf(ref.config.to_dict())
    ours = Embedder(load_exact(CLIP(cfg), hf_clip.state_from_hf(ref.state_dict(), cfg)), clip_tokenizer(),
                    device="cpu", batch_size=args.batch)
    captions = make_captions(args.captions)
    tok = ours.tokenizer
    ids = tok.encode_batch(captions)
    lengths = np.array([len(r) for r in ids])

    @torch.inference_mode()
    def theirs() -> np.ndarray:
        out = []
        for s in range(0, len(ids), args.batch):
            rows = ids[s:s + args.batch]
            L = max(map(len, rows))
            x = torch.full((len(rows), L), tok.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), L), dtype=torch.long)
            for r, row in enumerate(rows):
                x[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
            f = ref.get_text_features(input_ids=x, attention_mask=mask)
            f = f if torch.is_tensor(f) else f.pooler_output
            out.append(torch.nn.functional.normalize(f, dim=-1).numpy())
        return np.concatenate(out)

    def mine() -> np.ndarray:
        return ours.encode_text(captions)

    padded = sum(max(len(r) for r in ids[s:s + args.batch]) * len(ids[s:s + args.batch])
                 for s in range(0, len(ids), args.batch))
    srt = sorted(lengths)
    ends = _token_budget_ends(srt, args.batch * tok.context_length)  # encode_text's batches
    packed = sum(srt[e - 1] * (e - s) for s, e in zip([0, *ends[:-1]], ends, strict=True))
    print(f"{len(captions)} captions, tokens per caption: median {int(np.median(lengths))}, "
          f"mean {lengths.mean():.1f}, min {lengths.min()}, max {lengths.max()}; batch {args.batch}; "
          f"padded positions run: polymodal {packed:,} in {len(ends)} batches, input order {padded:,} "
          f"(real {lengths.sum():,}); "
          f"fp32, {torch.get_num_threads()} threads")
    a, b = mine(), theirs()  # also the warm-up
    diff = float(np.abs(a - b).max())
    t_ours, t_ref = timed_pair(mine, theirs, args.repeats, warmup=False)
    n = len(captions)
    print(f"polymodal {n / t_ours:.1f} captions/s, transformers {n / t_ref:.1f} captions/s, "
          f"speed ratio polymodal/reference {t_ref / t_ours:.2f}x (max abs diff of normalised embeddings {diff:.1e})")
    if diff > 1e-4:
        raise SystemExit(f"embeddings disagree: max abs diff {diff:.1e} > 1e-4")


if __name__ == "__main__":
    main()
