"""Training Flamingo on interleaved episodes: the vision tower and the LM frozen, the resampler and the
gated cross-attention blocks learning (Alayrac et al. 2022, section 3; one flat loop).

The vision tower is frozen, so each image's (or frame's) tokens are computed once and kept
(`VisionCache`); every step resamples them (the resampler learns) and runs the LM with the gated
blocks. AdamW with weight decay on p.dim() >= 2, linear warmup then cosine decay (`lr_at`), gradient
clipping; the tanh gates may take a larger learning rate (`gate_lr_scale`), since they start at zero
and open slowly in a short run. `evaluate_flamingo` scores held-out few-shot VQA (exact answer) and
video captions (does the caption name the direction, the shape, the colour?) with greedy decoding.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from polymodal.config import FlamingoConfig, ImageTransformConfig, PerceiverConfig
from polymodal.data.interleaved import IGNORE_INDEX, Episode, encode_episode
from polymodal.models.flamingo import Flamingo
from polymodal.models.lm import DecoderLM
from polymodal.models.vit import VisionTransformer
from polymodal.processing.image import load_image, preprocess
from polymodal.train.trainer import lr_at


@dataclass(frozen=True)
class FlamingoTrainConfig:
    steps: int = 300
    batch_size: int = 4
    lr: float = 3e-4
    gate_lr_scale: float = 10.0  # the tanh gates' learning rate, as a multiple of lr
    warmup: int = 20
    min_lr: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: off
    seed: int = 0
    bf16: bool = False  # bfloat16 autocast (weights stay fp32): ~3x faster matmuls on CPUs with AVX512-BF16

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.warmup < 0 or self.lr < 0:
            raise ValueError("FlamingoTrainConfig needs steps >= 1, batch_size >= 1, warmup >= 0 and lr >= 0")


def build_flamingo(lm: DecoderLM, vision: VisionTransformer, *, image_token_id: int,
                   image_transform: ImageTransformConfig, cross_every: int = 6, cross_start: int = 0,
                   perceiver: PerceiverConfig | None = None, xattn_mlp_dim: int | None = None,
                   end_of_chunk_token_id: int | None = None) -> Flamingo:
    """A new Flamingo around a pretrained LM and vision tower (copied in, frozen); gates at zero."""
    cfg = FlamingoConfig(vision=vision.cfg, perceiver=perceiver or PerceiverConfig(), lm=lm.cfg,
                         cross_every=cross_every, cross_start=cross_start, xattn_mlp_dim=xattn_mlp_dim, image_token_id=image_token_id,
                         end_of_chunk_token_id=end_of_chunk_token_id, image_transform=image_transform)
    model = Flamingo(cfg)
    model.vision.load_state_dict(vision.state_dict())
    model.lm.load_state_dict(lm.state_dict())
    model.freeze_pretrained()
    return model


class VisionCache:
    """The frozen vision tower's tokens (1 + N, width) per image file, computed once."""

    def __init__(self, model: Flamingo, batch: int = 64):
        self.model, self.batch = model, batch
        self.tokens: dict[str, Tensor] = {}

    @torch.no_grad()
    def fill(self, paths: Iterable[str]) -> None:
        todo = [p for p in dict.fromkeys(paths) if p not in self.tokens]
        transform = self.model.cfg.image_transform
        for i in range(0, len(todo), self.batch):
            chunk = todo[i:i + self.batch]
            px = torch.cat([preprocess(load_image(p), transform) for p in chunk])  # (n, C, H, W)
            with torch.autocast("cpu", enabled=False):  # the cache holds fp32, whatever the caller's autocast
                out = self.model.vision(px).tokens  # (n, 1 + N, width)
            self.tokens.update(zip(chunk, out, strict=True))

    def media(self, episodes: list[Episode]) -> Tensor:
        """(B, M, latents, width): every episode's items resampled (with gradients to the resampler);
        rows with fewer items are padded with zeros that no text token sees."""
        self.fill(p for e in episodes for item in e.media for p in item)
        model = self.model
        B, M = len(episodes), max(len(e.media) for e in episodes)
        L, D = model.cfg.perceiver.latents, model.cfg.vision.width
        groups: dict[int, list[tuple[int, int]]] = {}
        for b, e in enumerate(episodes):
            for m, item in enumerate(e.media):
                groups.setdefault(len(item), []).append((b, m))
        out = None
        for where in groups.values():  # one resampler call per frame count
            x = torch.stack([torch.stack([self.tokens[p] for p in episodes[b].media[m]]) for b, m in where])
            res = model.resampler(x)  # (G, L, D) from (G, F, 1 + N, D)
            out = torch.zeros(B, M, L, D, dtype=res.dtype) if out is None else out.to(res.dtype)
            rows, cols = zip(*where, strict=True)
            out = out.index_put((torch.tensor(rows), torch.tensor(cols)), res)
        return out


def collate(episodes: list[Episode], encode: Callable[[str], list[int]], cfg: FlamingoConfig,
            max_len: int = 512) -> dict[str, Tensor]:
    """Right-padded ids, attention_mask and targets (B, T) of training episodes."""
    lm = cfg.lm
    pad = lm.pad_token_id if lm.pad_token_id is not None else 0
    rows = [encode_episode(e, encode, cfg.image_token_id, lm.bos_token_id) for e in episodes]
    T = min(max(len(ids) for ids, _ in rows), max_len)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (i, t) in enumerate(rows):
        n = min(len(i), T)
        ids[b, :n], targets[b, :n], mask[b, :n] = torch.tensor(i[:n]), torch.tensor(t[:n]), 1
    return {"ids": ids, "targets": targets, "attention_mask": mask}


def param_groups(model: Flamingo, cfg: FlamingoTrainConfig) -> list[dict]:
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "gate" if name.endswith(("attn_gate", "ff_gate")) else "weights"
        groups.setdefault((kind, p.dim() >= 2), []).append(p)
    return [{"params": ps, "base_lr": cfg.lr * (cfg.gate_lr_scale if kind == "gate" else 1.0),
             "weight_decay": cfg.weight_decay if decay else 0.0} for (kind, decay), ps in groups.items()]


def train_flamingo(model: Flamingo, episodes: Iterator[Episode], encode: Callable[[str], list[int]],
                   cfg: FlamingoTrainConfig, *, cache: VisionCache | None = None, start: int = 0,
                   optimizer_state: dict | None = None, on_step: Callable[[int, dict], None] | None = None,
                   on_checkpoint: Callable[[int, torch.optim.Optimizer], None] | None = None,
                   checkpoint_every: int = 0) -> list[dict]:
    """Steps start .. cfg.steps on batches of cfg.batch_size episodes; the model is trained in place.
    Returns one metrics dict per step: loss, lr, grad_norm, the mean |tanh(gate)|. A resumed run
    passes the step it reached and its optimizer's state; on_checkpoint(step, optimizer) is called
    every `checkpoint_every` steps and at the end."""
    model.freeze_pretrained()
    cache = cache or VisionCache(model)
    groups = param_groups(model, cfg)
    trained = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    model.train()
    model.vision.eval()
    model.lm.eval()
    history = []
    for step in range(start, cfg.steps):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg, g["base_lr"])
        batch_eps = [next(episodes) for _ in range(cfg.batch_size)]
        batch = collate(batch_eps, encode, model.cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            media = cache.media(batch_eps)
            loss = model(batch["ids"], media=media, attention_mask=batch["attention_mask"],
                         targets=batch["targets"]).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        gates = torch.stack([torch.tanh(b.attn_gate).abs().mean() for b in model.xattn]).mean()
        metrics = {"step": step + 1, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                   "grad_norm": grad_norm.item(), "gate": gates.item()}
        history.append(metrics)
        if on_step is not None:
            on_step(step + 1, metrics)
        if on_checkpoint is not None and (step + 1 == cfg.steps or checkpoint_every and (step + 1) % checkpoint_every == 0):
            on_checkpoint(step + 1, optimizer)
    model.eval()
    return history


# --- evaluation ---------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split()


def score(episode: Episode, text: str) -> dict[str, bool]:
    """What a generated continuation got right: vqa its first word; video the direction, shape, colour."""
    if episode.kind == "vqa":
        words = _words(text)
        return {"correct": bool(words) and words[0] == episode.answer.lower()}
    meta = episode.meta
    said = " ".join(_words(text))
    return {"direction": meta["motion"] in said, "shape": meta["shape"] in said.split(),
            "colour": meta["colour"] in said.split()}


@torch.no_grad()
def evaluate_flamingo(model: Flamingo, episodes: list[Episode], encode: Callable[[str], list[int]],
                      decode: Callable[[list[int]], str], *, cache: VisionCache | None = None, batch_size: int = 8,
                      progress: bool = False, bf16: bool = False) -> dict:
    """Greedy answers to held-out episodes, prompted with all but their last scored segment.
    Returns per kind the accuracy of each score (and a few examples)."""
    model.eval()
    cache = cache or VisionCache(model)
    cfg, lm = model.cfg, model.cfg.lm
    pad = lm.pad_token_id if lm.pad_token_id is not None else 0
    results: dict[str, list[dict]] = {}
    examples: dict[str, list] = {}
    order = list(range(0, len(episodes), batch_size))
    if progress:
        from rich.progress import track

        order = track(order, description="evaluating", transient=True)
    for start in order:
        chunk = episodes[start:start + batch_size]
        prompts = [Episode(e.kind, e.media, e.segments[:-1]) for e in chunk]
        rows = [encode_episode(p, encode, cfg.image_token_id, lm.bos_token_id)[0] for p in prompts]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):  # left padding
            ids[b, T - len(r):], mask[b, T - len(r):] = torch.tensor(r), 1
        new = 4 if all(e.kind == "vqa" for e in chunk) else 14
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            media = cache.media(prompts)
            out = model.generate(ids, media=media, attention_mask=mask, max_new_tokens=new)
        for b, e in enumerate(chunk):
            text = decode(out.tokens[b, : int(out.lengths[b])].tolist())
            results.setdefault(e.kind, []).append(score(e, text))
            if len(examples.setdefault(e.kind, [])) < 4:
                examples[e.kind].append({"prompt": prompts[b].text[-60:], "answer": e.answer, "said": text})
    report = {}
    for kind, scores in results.items():
        keys = scores[0].keys()
        report[kind] = {"n": len(scores), **{k: round(sum(s[k] for s in scores) / len(scores), 4) for k in keys},
                        "examples": examples[kind]}
    return report


def eval_episodes(rng: random.Random, *, scenes: list[dict], clips: list[dict] | None = None, vqa: int = 100,
                  shots: int = 2) -> list[Episode]:
    """Held-out evaluation episodes: `vqa` few-shot VQA episodes (`shots` solved examples, then a
    query, all from held-out scenes) and one captioning episode per held-out clip."""
    from polymodal.data.interleaved import video_episode, vqa_episode

    out = [vqa_episode(rng, scenes, shots, score_shots=False) for _ in range(vqa)]
    for c in clips or []:
        out.append(video_episode(random.Random(0), [c]))
    return out


__all__ = ["FlamingoTrainConfig", "VisionCache", "build_flamingo", "collate", "eval_episodes",
           "evaluate_flamingo", "train_flamingo"]
