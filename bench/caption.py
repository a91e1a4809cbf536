"""Captioning with BLIP-2 (ViT-B/16 + a BERT-base Q-Former + an OPT-125m-shaped LM, random
weights), polymodal against transformers, same weights and images, one process.

    .venv/bin/python bench/caption.py [--new-tokens 30] [--batch 1 8] [--repeats 3]

Greedy, eos disabled so both make exactly --new-tokens tokens; tokens are checked equal,
then the two are timed alternately (median) and the ratio polymodal/reference printed.
"""

from __future__ import annotations

import argparse

import torch
from timing import timed_pair


def main() -> None:
    import transformers

    from polymodal.checkpoints import hf_blip2
    from polymodal.checkpoints.state import load_exact
    from polymodal.models.blip2 import Blip2

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=30)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    hf_cfg = transformers.Blip2Config(
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16),
        qformer_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            encoder_hidden_size=768),
        text_config=transformers.OPTConfig(hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                                           num_attention_heads=12, vocab_size=50272).to_dict(),
        num_query_tokens=32, image_token_index=50271)
    ref = transformers.Blip2ForConditionalGeneration(hf_cfg).eval()
    cfg = hf_blip2.config_from_hf(ref.config.to_dict())
    ours = load_exact(Blip2(cfg), hf_blip2.state_from_hf(ref.state_dict(), cfg)).eval()
    ours.lm.for_decoding()  # as polymodal.load_vlm lays it out (nn/layout.py)
    print(f"BLIP-2: ViT-B/16 + Q-Former (12 layers, 32 queries) + OPT-125m shapes, random weights, greedy, "
          f"{args.new_tokens} new tokens, fp32, {torch.get_num_threads()} threads")
    for batch in args.batch:
        pixels = torch.randn(batch, 3, 224, 224)

        def mine(pixels=pixels):
            return ours.generate(pixels, max_new_tokens=args.new_tokens, eos_token_id=-1).tokens

        def theirs(pixels=pixels):  # transformers starts a caption from [image tokens; BOS] itself
            out = ref.generate(pixel_values=pixels, do_sample=False, max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, eos_token_id=None)
            return out[:, -args.new_tokens:]

        with torch.inference_mode():
            same = torch.equal(mine(), theirs())
            t_ours, t_ref = timed_pair(mine, theirs, args.repeats, warmup=False)
            t_image, _ = timed_pair(lambda pixels=pixels: ours.visual_prompt(pixels), lambda: None, args.repeats)
        n = batch * args.new_tokens
        a, b = n / t_ours, n / t_ref
        print(f"batch {batch}: polymodal {a:.1f} tokens/s, transformers {b:.1f} tokens/s, "
              f"speed ratio polymodal/reference {a / b:.2f}x (tokens identical: {same})")
        # Amdahl: the image side (ViT + Q-Former + projection) runs once per caption, whatever the decoder does
        print(f"batch {batch}: the image side takes {t_image:.2f} s of the reference's {t_ref:.2f} s "
              f"({t_image / t_ref:.0%}); with a decoder that cost nothing the ratio would be {t_ref / t_image:.1f}x")


if __name__ == "__main__":
    main()
