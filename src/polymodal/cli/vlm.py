"""Commands over a vision-language model (BLIP-2): caption, ask, chat.

`--model` is required for now: polymodal ships no trained default VLM yet. It takes a polymodal
BLIP-2 directory or a transformers BLIP-2 (Blip2ForConditionalGeneration) directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from polymodal.cli import JSON, USER_ERRORS, _emit, _progress, command, say

VLM_MODEL = typer.Option(
    ...,
    "--model",
    "-m",
    help="A polymodal or transformers BLIP-2 directory. Required: no default VLM ships yet.",
)
MAX_NEW = typer.Option(30, "--max-new-tokens", min=1, help="At most this many new tokens per answer.")
BEAMS = typer.Option(1, "--num-beams", min=1, help="Beam search with this many beams (1: greedy).")


def _load(model: str):
    import polymodal

    return polymodal.load_vlm(model)


@command
def caption(
    target: Path = typer.Argument(..., help="An image file, or a folder whose images are all captioned."),
    model: str = VLM_MODEL,
    out: Path = typer.Option(
        Path("captions.jsonl"), "--out", "-o",
        help="Folder mode: the JSON-lines file to append {path, caption} to; a rerun skips what is there.",
    ),
    max_new_tokens: int = MAX_NEW,
    num_beams: int = BEAMS,
    json_: bool = JSON,
) -> None:
    """Caption an image, or every image in a folder (resumable, with a progress bar)."""
    if not target.exists():
        raise FileNotFoundError(f"{target}: no such file or directory")
    vlm = _load(model)
    gen = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
    if target.is_file():
        text = vlm.caption(target, **gen)
        return _emit({"image": str(target), "caption": text}) if json_ else typer.echo(text)
    result = vlm.caption_folder(target, out, progress=_progress(),
                                on_error=lambda p, message: say(f"skipped: {message}"), **gen)
    if result["skipped"] and not result["captioned"] and not result["already_done"]:
        raise ValueError(f"none of the {result['images']} images in {target} could be read")
    if json_:
        return _emit(result)
    typer.echo(f"{result['captioned']} captioned, {result['already_done']} already done, "
               f"{len(result['skipped'])} skipped -> {result['out']}")


@command
def ask(
    image: Path = typer.Argument(..., help="An image file."),
    question: str = typer.Argument(..., help="The question about the image."),
    model: str = VLM_MODEL,
    max_new_tokens: int = MAX_NEW,
    num_beams: int = BEAMS,
    json_: bool = JSON,
) -> None:
    """Answer one question about an image."""
    if not question.strip():
        raise ValueError("the question is empty: give some text")
    answer = _load(model).ask(image, question, max_new_tokens=max_new_tokens, num_beams=num_beams)
    if json_:
        return _emit({"image": str(image), "question": question, "answer": answer})
    typer.echo(answer)


@command
def chat(
    image: Path = typer.Argument(None, help="An image to talk about (optional; /image PATH sets one later)."),
    model: str = VLM_MODEL,
    max_new_tokens: int = MAX_NEW,
) -> None:
    """A terminal chat, one message per line on stdin, the answers streamed to stdout.
    Commands: /image PATH, /reset, /save PATH, /quit."""
    vlm = _load(model)
    session = vlm.chat(image, on_note=lambda m: say(f"note: {m}"), max_new_tokens=max_new_tokens)
    say("chat: /image PATH, /reset, /save PATH, /quit" + (f" (image: {image})" if image else ""))
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        word, _, arg = line.partition(" ")
        try:
            if word == "/quit":
                break
            if word == "/reset":
                session.reset()
                say("(conversation reset)")
            elif word == "/image":
                session.set_image(Path(arg.strip()))
                say(f"(image: {arg.strip()}; conversation reset)")
            elif word == "/save":
                say(f"(saved {session.save(Path(arg.strip() or 'chat.json'))})")
            elif word.startswith("/"):
                say(f"error: unknown command {word}; known: /image PATH, /reset, /save PATH, /quit")
            else:
                session.send(line, stream=lambda piece: typer.echo(piece, nl=False))
                typer.echo("")
        except USER_ERRORS as e:  # a bad image or line: say so and keep chatting
            say(f"error: {e}")
