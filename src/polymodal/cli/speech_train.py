"""`polymodal train speech`: the speech bridge (Whisper encoder -> Q-Former -> frozen LLM), from a recipe."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from polymodal.cli import JSON, _emit, _progress, command
from polymodal.cli.train import recipe_path, train_app


@command(name="speech", group=train_app)
def train_speech_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Where the trained bridge goes (our format; the frozen "
                             "Whisper and LLM are referenced, not copied). A rerun resumes there."),
    config: str = typer.Option("speech-bridge", "--config", "-c", help="A recipe .json or a shipped recipe name."),
    steps: int = typer.Option(None, "--steps", min=1, help="Override the recipe's training steps."),
    json_: bool = JSON,
) -> None:
    """Train a speech bridge into a frozen chat LLM on espeak-ng speech (clips, the LLM's own answers and
    the encoder's states are made once and kept in --out)."""
    from dataclasses import replace

    from polymodal.train.speech_bridge import SpeechRecipe, train_speech

    recipe = SpeechRecipe.from_dict(json.loads(recipe_path(config).read_text()))
    if steps is not None:
        recipe = replace(recipe, train=replace(recipe.train, steps=steps))
    show = _progress() or not json_  # progress lines on stderr (stdout stays one JSON document)
    last: dict = {}

    def on_step(step: int, row: dict) -> None:
        last.update(step=step, loss=row["loss"])
        if show and (step % 10 == 0 or step == recipe.train.steps):
            typer.echo(f"step {step}/{recipe.train.steps}: loss {row['loss']:.4f}", err=True)

    def on_progress(what: str, done: int, total: int) -> None:
        if show:
            typer.echo(f"{what}: {done}/{total}", err=True)

    path = train_speech(recipe, out, on_step=on_step, on_progress=on_progress)
    if json_:
        return _emit({"out": str(path), **last})
    typer.echo(f"trained to step {last.get('step', recipe.train.steps)}, loss {last.get('loss', float('nan')):.4f}"
               f" -> {path}")
