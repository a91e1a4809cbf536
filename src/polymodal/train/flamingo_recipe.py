"""The Flamingo recipe end to end: a frozen LM and vision tower, interleaved episodes from the scenes,
emoji and clip sets, held-out evaluation at the zero-gate start and after training, a resumable run.

    out/
      recipe.json            what the run was asked (paths, sizes, FlamingoTrainConfig)
      metrics.jsonl          one line per step (loss, lr, grad_norm, gate)
      eval_start.json        held-out few-shot VQA and video captioning at the zero-gate start
      eval_end.json          the same after training
      state.pt               trainable weights, optimizer, step: what resume needs
      config.json, model.safetensors, tokenizer*, chat_template.jinja   the trained model
                             (`polymodal.load_vlm(out)` reads it)

A killed run started again with the same `out` continues from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from pathlib import Path

import torch

from polymodal.config import PerceiverConfig
from polymodal.data.interleaved import read_clips, read_emoji, read_scenes, training_episodes
from polymodal.train.flamingo import (
    FlamingoTrainConfig,
    VisionCache,
    build_flamingo,
    eval_episodes,
    evaluate_flamingo,
    train_flamingo,
)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(("resampler.", "xattn."))}


def _dump(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def run_recipe(out, *, lm_path, vision_path=None, scenes, clips=None, emoji=None,
               train: FlamingoTrainConfig = FlamingoTrainConfig(), perceiver: PerceiverConfig | None = None,
               cross_every: int = 4, cross_start: int = 0, image_token: str | int = "<image>",
               eval_vqa: int = 64, eval_clips: int = 48, shots: int = 2, checkpoint_every: int = 25,
               progress: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Train (or resume) a Flamingo in `out`; returns {"start": eval, "end": eval, "steps", "out"}."""
    import polymodal
    from polymodal.checkpoints.flamingo_io import save_flamingo
    from polymodal.checkpoints.gguf import load_lm

    log = log or (lambda message: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm, tokenizer, chat_template = load_lm(lm_path)
    if tokenizer is None:
        raise ValueError(f"{lm_path}: the LM has no tokenizer")
    image_id = image_token if isinstance(image_token, int) else tokenizer.backend.token_to_id(image_token)
    if image_id is None:
        raise ValueError(f"the LM's tokenizer has no token {image_token!r} to mark images with")
    clip = polymodal.load(vision_path).model
    torch.manual_seed(train.seed)  # the new parts' initial weights
    model = build_flamingo(lm, clip.visual, image_token_id=image_id, image_transform=clip.cfg.image_transform,
                           cross_every=cross_every, cross_start=cross_start, perceiver=perceiver)
    del lm, clip
    encode = lambda text: tokenizer.backend.encode(text, add_special_tokens=False).ids  # noqa: E731
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731

    train_scenes, test_scenes = read_scenes(scenes, "train"), read_scenes(scenes, "test")
    train_clips = read_clips(clips, "train") if clips else None
    test_clips = read_clips(clips, "test")[:eval_clips] if clips else None
    train_emoji = read_emoji(emoji, "train") if emoji else None
    if len(test_scenes) < shots + 1 or not train_scenes:
        raise ValueError(f"{scenes}: too few scenes (train {len(train_scenes)}, test {len(test_scenes)})")
    held_out = eval_episodes(random.Random(1234), scenes=test_scenes, clips=test_clips, vqa=eval_vqa, shots=shots)
    _dump(out / "recipe.json", {"lm": str(lm_path), "vision": str(vision_path or "polymodal default CLIP"),
                                "scenes": str(scenes), "clips": str(clips), "emoji": str(emoji),
                                "image_token_id": image_id, "cross_every": cross_every, "cross_start": cross_start,
                                "perceiver": dataclasses.asdict(model.cfg.perceiver),
                                "train": dataclasses.asdict(train), "eval_vqa": eval_vqa,
                                "eval_clips": len(test_clips or []), "shots": shots,
                                "train_sizes": {"scenes": len(train_scenes), "clips": len(train_clips or []),
                                                "emoji": len(train_emoji or [])}})
    cache = VisionCache(model)

    if (out / "eval_start.json").is_file():
        before = json.loads((out / "eval_start.json").read_text())
    else:
        log("evaluating the zero-gate start")
        before = evaluate_flamingo(model, held_out, encode, decode, cache=cache, progress=progress, bf16=train.bf16)
        _dump(out / "eval_start.json", before)
    start, optimizer_state = 0, None
    state_file = out / "state.pt"
    if state_file.is_file():
        state = torch.load(state_file, weights_only=True)
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        if unexpected or any(k.startswith(("resampler.", "xattn.")) for k in missing):
            raise ValueError(f"{state_file}: does not fit this model (a run with other sizes?)")
        start, optimizer_state = int(state["step"]), state["optimizer"]
        log(f"resuming at step {start}")

    metrics = out / "metrics.jsonl"
    if metrics.is_file():  # drop lines past the checkpoint (a kill between a step and its checkpoint)
        keep = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= start]
        metrics.write_text("".join(line + "\n" for line in keep))

    def on_step(step: int, m: dict) -> None:
        with open(metrics, "a") as f:
            f.write(json.dumps(m) + "\n")
        if step % 10 == 0 or step == 1:
            log(f"step {step}: loss {m['loss']:.3f} gate {m['gate']:.3f}")

    def on_checkpoint(step: int, optimizer) -> None:
        tmp = state_file.with_suffix(".tmp")
        torch.save({"model": trainable_state(model), "optimizer": optimizer.state_dict(), "step": step}, tmp)
        tmp.replace(state_file)

    episodes = training_episodes(random.Random(f"{train.seed}:{start}"), scenes=train_scenes, emoji=train_emoji,
                                 clips=train_clips)
    if start < train.steps:
        train_flamingo(model, episodes, encode, train, cache=cache, start=start, optimizer_state=optimizer_state,
                       on_step=on_step, on_checkpoint=on_checkpoint, checkpoint_every=checkpoint_every)
    log("evaluating the trained model")
    after = evaluate_flamingo(model, held_out, encode, decode, cache=cache, progress=progress, bf16=train.bf16)
    _dump(out / "eval_end.json", after)
    save_flamingo(model, out, tokenizer, chat_template)
    return {"out": str(out), "steps": train.steps, "start": before, "end": after}


__all__ = ["run_recipe", "trainable_state"]
