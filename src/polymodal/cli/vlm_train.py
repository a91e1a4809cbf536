"""`polymodal train vlm`: BLIP-2's two stages into a frozen LLM (train/vlm.py), and the recipe's lookup stage
between them if it has one, from a recipe."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from polymodal.cli import JSON, _emit, _progress, command
from polymodal.cli.train import recipe_path, train_app


@command(name="vlm", group=train_app)
def train_vlm_cmd(
    data: Path = typer.Option(..., "--data", "-d", help="A folder with captions.jsonl (emoji, clip art, scenes: "
                              "`polymodal data mix`); scenes' question-answer pairs become VQA turns."),
    out: Path = typer.Option(..., "--out", "-o", help="Where the trained VLM goes (our format; the frozen "
                             "vision tower and LLM are referenced, not copied)."),
    config: str = typer.Option("default-vlm", "--config", "-c", help="A recipe .json or a shipped recipe name."),
    stage1_steps: int = typer.Option(None, "--stage1-steps", help="Override the recipe's stage-1 steps."),
    stage2_steps: int = typer.Option(None, "--stage2-steps", help="Override the recipe's stage-2 steps."),
    lookup_steps: int = typer.Option(None, "--lookup-steps", help="Override the steps of the recipe's lookup "
                                     "stage (between stages 1 and 2; the recipe must have one)."),
    json_: bool = JSON,
) -> None:
    """Train a BLIP-2 bridge (Q-Former + projection) between a frozen ViT and a frozen chat LLM."""
    from dataclasses import replace

    from polymodal.train.vlm import VLMRecipe, train_vlm

    recipe = VLMRecipe.from_dict(json.loads(recipe_path(config).read_text()))
    if stage1_steps is not None:
        recipe = replace(recipe, stage1=replace(recipe.stage1, steps=stage1_steps))
    if stage2_steps is not None:
        recipe = replace(recipe, stage2=replace(recipe.stage2, steps=stage2_steps))
    if lookup_steps is not None:
        if recipe.lookup is None:
            raise ValueError(f"{config}: the recipe has no lookup stage (\"lookup\") whose steps --lookup-steps could set")
        recipe = replace(recipe, lookup=replace(recipe.lookup, steps=lookup_steps))
    if not (data / "captions.jsonl").is_file():
        raise FileNotFoundError(f"{data}: no captions.jsonl (build one with `polymodal data ...`)")

    last: dict = {}

    def on_step(stage: str, step: int, row: dict) -> None:
        last.update(stage=stage, step=step, loss=row["loss"])
        if show and step % 10 == 0:
            typer.echo(f"{stage} step {step}: loss {row['loss']:.4f}", err=True)

    def on_features(done: int, total: int) -> None:
        if show:
            typer.echo(f"ViT features: {done}/{total} images", err=True)

    def on_chats(done: int, total: int) -> None:
        if show:
            typer.echo(f"follow-up chats from the LLM: {done}/{total}", err=True)

    show = _progress()
    path = train_vlm(recipe, data, out, on_step=on_step, on_features=on_features, on_chats=on_chats)
    if json_:
        return _emit({"out": str(path), **last})
    typer.echo(f"trained {last.get('stage')} to step {last.get('step')}, loss {last.get('loss', float('nan')):.4f} -> {path}")
