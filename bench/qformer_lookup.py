"""Can an instruction-aware Q-Former learn the lookup itself, from the answers alone, before stage 2?

    python bench/qformer_lookup.py --run runs/vlm11 --data data/mix2 [--steps 1500] [--types colour]

An experiment for the default VLM (MODEL_CARD.md, "A direct answer objective does not teach the
lookup"), not a recipe option. RUN is an instruction-aware training run (`"instruction": true`):
its recipe, cached tower features and, unless --fresh, its `stage1.safetensors`. Its stage-2
model (Q-Former reading the question beside its queries, `instruction_proj`, `language_projection`)
is trained on the scenes' questions with no pass through the LLM: the visual prompt must point at
the answer. Each of the answers' first tokens (19: colours, shapes, numbers, yes, no) is scored by
its best query, max over queries of the cosine between the query's prompt vector and the LLM's
word embedding of that token (a logsumexp at a fixed temperature,
train/vlm_lookup.py's `point_scores`, which a recipe's lookup stage trains with); cross-entropy on the
right one. Each step is about 0.18 s (batch 64), against about 1.1 s for a stage-2 step.

Printed, on held-out scenes (split "test", up to --per-type questions a type):
  - lookup: the best-pointed answer among the question type's answers, every 500 steps;
  - LLM: at the end, what the frozen LLM, prompted as `VLM.ask` prompts it, scores highest at the
    answer's first position among the same answers. Nothing trained it to read the prompt.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from polymodal.train.chat_rows import ChatFormat
from polymodal.train.vlm import (
    VLMRecipe,
    build_models,
    cached_features,
    load_examples,
    load_stage2_init,
    match_prompt_scale,
    transfer_qformer,
    vision_features,
)
from polymodal.train.vlm_data import _padded
from polymodal.train.vlm_lookup import point_scores
from polymodal.train.vlm_lookup import scene_questions as questions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="an instruction-aware VLM training run (recipe, features, stage 1)")
    ap.add_argument("--data", required=True, help="the mix the run trained on (captions.jsonl with scenes)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--types", default="", help="train on these question types only (comma-separated)")
    ap.add_argument("--per-type", type=int, default=150, help="held-out questions scored per type")
    ap.add_argument("--fresh", action="store_true", help="start from a fresh Q-Former, not the run's stage 1")
    ap.add_argument("--in-queries", action="store_true",
                    help="add the question's mean word to every query too (Blip2Config.instruction_in_queries)")
    ap.add_argument("--fp32", action="store_true", help="train in float32 (default: bfloat16 autocast, as stage 2)")
    ap.add_argument("--init", default=None,
                    help="start from these trained stage-2 parts (a run's lookup.safetensors, or --save's file); "
                         "with --steps 0 this only scores them")
    ap.add_argument("--save", default=None,
                    help="write the trained parts (Q-Former, instruction_proj, projection) to this safetensors file, "
                         "for a recipe's stage2_init")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    run, data = Path(args.run), Path(args.data)
    recipe = VLMRecipe.from_dict({**json.loads((run / "recipe.json").read_text()),
                                  **({"instruction_in_queries": True} if args.in_queries else {})})
    if not recipe.instruction:
        raise SystemExit(f"{run}: not an instruction-aware run (its recipe has no \"instruction\": true)")
    stage1, model, tokenizer, template, _ = build_models(recipe)
    train = load_examples(data, "train")
    features, _ = cached_features(run / "features.safetensors", stage1, recipe.vision, [e["image"] for e in train])
    if not args.fresh:
        from safetensors.torch import load_file

        stage1.load_state_dict(load_file(str(run / "stage1.safetensors")))
    transfer_qformer(stage1, model)
    match_prompt_scale(model, features[:256])
    if args.init:
        load_stage2_init(model, args.init)
    fmt = ChatFormat(tokenizer, template, model.cfg.lm.eos_ids[0])

    items = questions(train, fmt)
    answers = sorted({token for *_, token in items})
    index = {t: k for k, t in enumerate(answers)}
    kinds: dict[str, set[int]] = defaultdict(set)
    for _, kind, _, token in items:
        kinds[kind].add(index[token])
    of_type = {k: sorted(v) for k, v in kinds.items()}
    if args.types:
        items = [it for it in items if it[1] in args.types.split(",")]
    test = load_examples(data, "test")
    held = questions(test, fmt)
    random.Random(args.seed).shuffle(held)
    by_kind: dict[str, list] = defaultdict(list)
    for it in held:
        by_kind[it[1]].append(it)
    held = [it for kind in sorted(by_kind) for it in by_kind[kind][:args.per_type]]
    shown = sorted({i for i, *_ in held})
    at = {i: k for k, i in enumerate(shown)}
    held_features, _ = vision_features(stage1.visual, [test[i]["image"] for i in shown], stage1.cfg.image_transform,
                                       slots=stage1.slots)
    print(f"{len(items)} training questions, {len(held)} held out, {len(answers)} answer tokens", flush=True)

    answer_embeds = model.lm.token_embed.weight.detach()[answers]
    lookup = lambda prompt: point_scores(prompt, answer_embeds)  # noqa: E731
    context = model.cfg.qformer.context_length
    encode = tokenizer.backend.encode

    def prompts(rows, f: torch.Tensor) -> torch.Tensor:
        ids, mask = _padded([encode(q, add_special_tokens=False).ids[:context] for _, _, q, _ in rows], tokenizer.pad_id)
        return model.visual_prompt(None, features=f, instruction=ids, instruction_mask=mask)

    def best_of_type(scores: torch.Tensor, rows) -> list[bool]:
        return [of_type[kind][int(scores[r, of_type[kind]].argmax())] == index[token]
                for r, (_, kind, _, token) in enumerate(rows)]

    @torch.no_grad()
    def evaluate(through_llm: bool) -> tuple[dict, dict]:
        model.eval()
        n, pointed, read = Counter(), Counter(), Counter()
        lm, prefix = model.lm, fmt.before
        for k in range(0, len(held), 32):
            rows = held[k:k + 32]
            visual = prompts(rows, held_features[[at[i] for i, *_ in rows]].float())
            for (_, kind, _, _), ok in zip(rows, best_of_type(lookup(visual), rows), strict=True):
                n[kind] += 1
                pointed[kind] += ok
            if through_llm:
                turns = [fmt.turns([(q, "")]) for _, _, q, _ in rows]  # the answer's first position
                B, Q, P = visual.shape[0], visual.shape[1], len(prefix)
                ids = torch.full((B, max(len(t) for t, _ in turns)), tokenizer.pad_id)
                for r, (t, _) in enumerate(turns):
                    ids[r, :len(t)] = torch.tensor(t)
                x = torch.cat([lm.embed(torch.tensor([prefix]).expand(B, -1)).to(visual.dtype), visual,
                               lm.embed(ids).to(visual.dtype)], 1)
                hidden = lm(inputs_embeds=x, logits=False).hidden
                scores = torch.stack([lm.head(hidden[r, P + Q + spans[0][0] - 1])[answers]
                                      for r, (_, spans) in enumerate(turns)])
                for (_, kind, _, _), ok in zip(rows, best_of_type(scores, rows), strict=True):
                    read[kind] += ok
        model.train()
        return ({k: round(pointed[k] / n[k], 3) for k in sorted(n)},
                {k: round(read[k] / n[k], 3) for k in sorted(n)} if through_llm else {})

    print("before training: lookup", *evaluate(True), flush=True)
    for p in model.parameters():
        p.requires_grad_(False)
    trained = [p for name, p in model.named_parameters()
               if name.startswith(("qformer.", "language_projection.", "instruction_proj."))]
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.05)
    rng = random.Random(args.seed)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        rows = [items[rng.randrange(len(items))] for _ in range(args.batch_size)]
        with torch.autocast("cpu", torch.bfloat16, enabled=not args.fp32):
            visual = prompts(rows, features[[i for i, *_ in rows]].float())
        loss = F.cross_entropy(lookup(visual), torch.tensor([index[token] for *_, token in rows]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
        if step % 500 == 0 or step == args.steps:
            pointed, read = evaluate(step == args.steps)
            print(f"step {step}: lookup {pointed}" + (f", through the LLM {read}" if read else ""), flush=True)
    if args.save:
        from safetensors.torch import save_file

        save_file({name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad},
                  args.save)
        print(f"saved the trained parts to {args.save}")


if __name__ == "__main__":
    main()
