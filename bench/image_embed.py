"""Image embedding, polymodal against transformers, same weights, same inputs, one process.

    .venv/bin/python bench/image_embed.py [--preset ViT-B-32] [--batch 1 32] [--repeats 5]

Converts one set of random weights into both implementations, checks the embeddings agree,
then alternates timed runs (warm-up, median of `repeats`) and prints polymodal/reference.
"""

from __future__ import annotations

import argparse

import torch
from timing import timed_pair


def main() -> None:
    import transformers

    from polymodal.checkpoints import hf_clip
    from polymodal.checkpoints.state import load_exact
    from polymodal.models.clip import CLIP

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    torch.manual_seed(0)
    ref = transformers.CLIPModel(transformers.CLIPConfig()).eval()  # ViT-B/32 shapes
    cfg = hf_clip.config_from_hf(ref.config.to_dict())
    ours = load_exact(CLIP(cfg), hf_clip.state_from_hf(ref.state_dict(), cfg)).eval()
    print(f"ViT-B/32 shapes, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for batch in args.batch:
        pixels = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            a = ours.image_features(pixels, normalize=False)
            b = ref.get_image_features(pixel_values=pixels)
            b = b if torch.is_tensor(b) else b.pooler_output
            diff = (a - b).abs().max().item()
            t_ours, t_ref = timed_pair(lambda x=pixels: ours.image_features(x, normalize=False),
                                       lambda x=pixels: ref.get_image_features(pixel_values=x), args.repeats)
        print(f"batch {batch:3d}: polymodal {batch / t_ours:7.1f} img/s, transformers {batch / t_ref:7.1f} img/s, "
              f"speed ratio polymodal/reference {t_ref / t_ours:.2f}x (max abs diff {diff:.1e})")


if __name__ == "__main__":
    main()
