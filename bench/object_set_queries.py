"""Can the stage-1 Q-Former's queries keep each object's colour bound to its shape? Train them on a
DETR-style object-set objective, then probe them as bench/probe_binding.py does.

    python bench/object_set_queries.py --run runs/vlm11 --data data/mix2 [--steps 1500]

An experiment for the default VLM (MODEL_CARD.md, "The binding is lost in the Q-Former"), not yet a
recipe option. From RUN's recipe and cached tower features, a fresh stage-1 Q-Former is trained on
the generated scenes alone. Each object of a scene must be claimed by one query: the query names
the object's phrase (size x colour x shape, 64 classes, or "no object") and its centre. Queries and
objects are paired by Hungarian matching on those two costs (Carion et al. 2020, DETR). Then the
binding probe of bench/probe_binding.py reads the queries: "what colour is the <shape>?" on
held-out scenes of two to four objects.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from probe_binding import load_run, run_probe  # noqa: E402

from polymodal.models.blip2 import read_image  # noqa: E402
from polymodal.train.scene_tower import NO_OBJECT, set_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a VLM training run: recipe.json and the cached tower features")
    ap.add_argument("--data", required=True, help="the mix the run trained on (captions.jsonl with scenes)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    loaded = load_run(Path(args.run), Path(args.data))
    _, stage1, objects, train, _, features = loaded
    scenes = [i for i, e in enumerate(train) if e["dataset"] == "scenes" and e["image"] in objects]

    qformer = stage1.qformer
    width = qformer.query_tokens.shape[-1]
    phrase_head, centre_head = nn.Linear(width, NO_OBJECT + 1), nn.Linear(width, 2)
    params = [*qformer.parameters(), *phrase_head.parameters(), *centre_head.parameters()]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.05)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        picked = [scenes[rng.randrange(len(scenes))] for _ in range(args.batch_size)]
        with torch.autocast("cpu", torch.bfloat16):
            queries = qformer(read_image(stage1, None, features[picked].float(), False)).queries
        queries = queries.float()
        loss = set_loss(phrase_head(queries).log_softmax(-1), centre_head(queries).sigmoid(),
                        [objects[train[i]["image"]] for i in picked])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 250 == 0:
            print(f"step {step}: object-set loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)

    stage1.eval()

    def queries_of(f: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([qformer(read_image(stage1, None, f[k:k + 256].float(), False)).queries.float()
                              for k in range(0, f.shape[0], 256)])

    run_probe(loaded, queries_of, what="the object-set queries", seed=args.seed)


if __name__ == "__main__":
    main()
