"""The `polymodal` command line: a thin group of subcommands over the library.

Every command takes `--json` (exactly one JSON document on stdout). A bad input is one line
on stderr and exit code 2; a batch skips its bad inputs, names each on stderr and exits 0
if at least one worked. The commands live beside this file, one module per area:
clip.py (embedding, similarity, classification, conversion, the demo), train.py (training,
evaluation, shards, metrics), data.py (data set builders).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from polymodal.checkpoints.state import CheckpointError
from polymodal.processing.image import ImageError
from polymodal.tasks.embed import TextError

app = typer.Typer(
    help=__doc__.split("\n\n")[0], no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)

# What bad input raises (ImageError, TextError, CheckpointError are ValueErrors; OSError covers a
# missing file and an --out that cannot be written).
USER_ERRORS = (ImageError, TextError, CheckpointError, ValueError, OSError)
MODEL = typer.Option(
    None,
    "--model",
    "-m",
    help="Checkpoint: a polymodal or transformers CLIP directory, OpenCLIP weights, or a hub id "
    "(default: the embedded default model).",
)
IMAGES = typer.Option(
    None,
    "--image",
    "-i",
    help="An image file; repeat the flag for more: "
    "--image a.png --image b.png (a bad image is skipped and named on stderr).",
)
TEXTS = typer.Option(
    None, "--text", "-t", help="A text; repeat the flag for more: --text 'a cat' --text 'a dog'."
)
JSON = typer.Option(False, "--json", help="Print one JSON document on stdout instead of tables.")


def say(message: str) -> None:
    """One line on stderr, whatever the terminal width."""
    typer.echo(" ".join(str(message).split()), err=True)


def chat_loop(session, answer: Callable[[str], None], commands: dict[str, Callable[[str], str | None]]) -> None:
    """The terminal chat's loop over stdin, shared by the image and the spoken chat: a line is a turn
    (`answer(line)`), `/NAME ARG` runs `commands["/NAME"](ARG)` and says the note it returns (if any), and /reset,
    /save PATH and /quit are always there. A bad line is said in one line and the chat goes on."""
    known = ", ".join([*(f"{name} PATH" for name in commands), "/reset", "/save PATH", "/quit"])
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
            elif word == "/save":
                say(f"(saved {session.save(Path(arg.strip() or 'chat.json'))})")
            elif word in commands:
                if note := commands[word](arg.strip()):
                    say(note)
            elif word.startswith("/"):
                say(f"error: unknown command {word}; known: {known}")
            else:
                answer(line)
        except USER_ERRORS as e:  # a bad file or line: say so and keep chatting
            say(f"error: {e}")


def command(fn=None, *, name: str | None = None, group: typer.Typer | None = None):
    """Register `fn` on the app (or a sub-group), turning the errors of bad input into one
    stderr line and exit code 2. Use as `@command` or `@command(name=..., group=...)`."""
    if fn is None:
        return lambda f: command(f, name=name, group=group)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            filename = getattr(e, "filename", None)  # an OSError: "path: Permission denied"
            say(f"error: {filename}: {e.strerror}" if filename and e.strerror else f"error: {e}")
            raise typer.Exit(2) from None

    return (group or app).command(name)(run)


@app.callback()
def _setup() -> None:
    import rich

    rich.reconfigure(stderr=True)  # progress bars go to stderr, so stdout stays clean for --json


def _progress() -> bool:
    return sys.stderr.isatty()


def _console():
    from rich.console import Console

    return Console()


def _emit(doc: dict) -> None:
    typer.echo(json.dumps(doc))


def main() -> None:
    app(prog_name="polymodal")


# The commands register themselves on `app` when their modules are imported.
import polymodal.cli.speech_train  # noqa: E402, F401
from polymodal.cli import audio, clip, data, flamingo, index, serve, train, vlm, vlm_train  # noqa: E402, F401
