"""Contrastive training throughput, polymodal against transformers, same weights and batch.

    .venv/bin/python bench/train_throughput.py [--width 384 --layers 6] [--batch 32] [--repeats 3]

Both sides take one AdamW step on the same batch from the same weights: polymodal's CLIP
with its ClipLoss, and `transformers.CLIPModel(return_loss=True)`. Checks the losses agree,
then alternates timed steps (warm-up, median) and prints samples/s and the ratio.
"""

from __future__ import annotations

import argparse
import copy

import torch
from timing import timed_pair


def main() -> None:
    import transformers

    from polymodal.checkpoints import hf_clip
    from polymodal.checkpoints.state import load_exact
    from polymodal.models.clip import CLIP
    from polymodal.train.losses import ClipLoss

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=int, default=768, help="vision width (text width is 2/3 of it)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    w, tw = args.width, args.width * 2 // 3
    hf_cfg = transformers.CLIPConfig(
        vision_config=dict(hidden_size=w, intermediate_size=4 * w, num_hidden_layers=args.layers,
                           num_attention_heads=w // 64, patch_size=32, image_size=224),
        text_config=dict(hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=args.layers,
                         num_attention_heads=max(1, tw // 64)),
        projection_dim=512)
    ref = transformers.CLIPModel(hf_cfg).train()
    cfg = hf_clip.config_from_hf(ref.config.to_dict())
    ours = load_exact(CLIP(cfg), hf_clip.state_from_hf(copy.deepcopy(ref.state_dict()), cfg)).train()
    loss_fn = ClipLoss()
    pixels = torch.randn(args.batch, 3, 224, 224)
    ids = torch.randint(1, 49000, (args.batch, 20))
    ids[:, 0], ids[:, -1] = 49406, 49407
    mask = torch.ones_like(ids)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-5, foreach=True)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-5, foreach=True)

    def step_ours() -> float:
        out = ours(pixels, ids, mask)
        loss = loss_fn(out.image_embeds, out.text_embeds, ours.logit_scale)["contrastive_loss"]
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.item()

    def step_ref() -> float:
        loss = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True).loss
        loss.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        return loss.item()

    a, b = step_ours(), step_ref()  # the first steps also warm up
    print(f"vision width {w} x {args.layers} layers, text width {tw}, batch {args.batch}, fp32, "
          f"{torch.get_num_threads()} threads; first-step losses {a:.6f} vs {b:.6f} (diff {abs(a - b):.1e})")
    t_ours, t_ref = timed_pair(step_ours, step_ref, args.repeats, warmup=False)
    s_ours, s_ref = args.batch / t_ours, args.batch / t_ref
    print(f"polymodal {s_ours:.1f} samples/s, transformers {s_ref:.1f} samples/s, "
          f"speed ratio polymodal/reference {s_ours / s_ref:.2f}x")


if __name__ == "__main__":
    main()
