"""Image embedding, polymodal against transformers, same weights, same inputs, one process.

    .venv/bin/python bench/image_embed.py [--batch 1 32] [--repeats 5] [--int8] [--compile]

Converts one set of random ViT-B/32 CLIP weights into both implementations, checks the
embeddings agree, then alternates timed runs (warm-up, median of `repeats`) and prints
polymodal/reference, and the GFLOP/s polymodal reaches against the fp32 matmul peak
(a 2048^3 torch.mm, measured alternately with the model runs). Effective GFLOP/s: the full
model's FLOPs (all of which the reference computes) over polymodal's time. --int8: also polymodal
with int8 dynamic quantization (nn/quant.py) against the fp32 reference, with the
cosine of its embeddings to fp32. --compile: also polymodal under torch.compile.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from timing import matmul_gflops, timed_pair


def vit_gflop(cfg) -> float:
    """GFLOP (2 x multiply-adds) of one image through the ViT and its projection."""
    v = cfg.vision
    n = (v.image_size // v.patch_size) ** 2
    T, d = n + 1, v.width
    patch = 2 * n * v.channels * v.patch_size**2 * d
    layer = 2 * T * (4 * d * d + 2 * d * v.mlp_dim) + 2 * 2 * T * T * d  # projections, MLP, QK^T and AV
    return (patch + v.layers * layer + 2 * d * cfg.embed_dim) / 1e9


def main() -> None:
    import transformers

    from polymodal.checkpoints import hf_clip
    from polymodal.checkpoints.state import load_exact
    from polymodal.models.clip import CLIP
    from polymodal.nn.quant import quantize_int8

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    ref = transformers.CLIPModel(transformers.CLIPConfig()).eval()  # ViT-B/32 shapes
    cfg = hf_clip.config_from_hf(ref.config.to_dict())
    ours = load_exact(CLIP(cfg), hf_clip.state_from_hf(ref.state_dict(), cfg)).eval()
    gflop = vit_gflop(cfg)
    print(f"ViT-B/32 shapes ({gflop:.2f} GFLOP an image), fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    variants = {"fp32": lambda x: ours.image_features(x, normalize=False)}
    if args.int8:
        q = quantize_int8(ours)
        variants["int8"] = lambda x: q.image_features(x, normalize=False)
    if args.compile:
        compiled = torch.compile(ours.image_features)
        variants["compiled"] = lambda x: compiled(x, normalize=False)

    def reference(x):
        b = ref.get_image_features(pixel_values=x)
        return b if torch.is_tensor(b) else b.pooler_output

    for batch in args.batch:
        pixels = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            b = reference(pixels)
            for name, fn in variants.items():
                a = fn(pixels)
                diff = (a - b).abs().max().item()
                cos = torch.nn.functional.cosine_similarity(a, b).min().item()
                if name == "fp32" and diff > 1e-4:
                    raise SystemExit(f"batch {batch}: embeddings disagree, max abs diff {diff:.1e}")
                if name == "int8" and cos < 0.99:
                    raise SystemExit(f"batch {batch}: int8 embeddings drift, cosine to fp32 {cos:.4f} < 0.99")
                peaks = []
                for _ in range(max(1, args.repeats // 3) if name == "fp32" else 0):
                    peaks.append(matmul_gflops(repeats=1))
                t_ours, t_ref = timed_pair(lambda x=pixels, f=fn: f(x), lambda x=pixels: reference(x), args.repeats)
                line = (f"batch {batch:3d} {name:8s}: polymodal {batch / t_ours:7.1f} img/s, transformers (fp32) "
                        f"{batch / t_ref:7.1f} img/s, speed ratio polymodal/reference {t_ref / t_ours:.2f}x "
                        f"(max abs diff {diff:.1e}, min cosine {cos:.5f})")
                if peaks:
                    peaks.append(matmul_gflops(repeats=1))
                    peak = statistics.median(peaks)
                    achieved = gflop * batch / t_ours
                    line += (f"; {achieved:.1f} effective GFLOP/s = {100 * achieved / peak:.0f}% of the fp32 matmul peak "
                             f"{peak:.1f} GFLOP/s (reference {100 * gflop * batch / t_ref / peak:.0f}%)")
                print(line, flush=True)


if __name__ == "__main__":
    main()
