"""Commands over a vision-language model (BLIP-2 or Flamingo): caption, ask, chat.

Without `--model`, the embedded default VLM answers (MODEL_CARD.md); `ask --audio` / `chat --audio`
need only `--speech-model`. `--model` takes a polymodal BLIP-2 directory or a transformers BLIP-2
(Blip2ForConditionalGeneration) directory, or a polymodal Flamingo directory or a transformers
IDEFICS one (several images, --video, --shots).
"""

from __future__ import annotations

from pathlib import Path

import typer

from polymodal.cli import JSON, _emit, _progress, chat_loop, command, say
from polymodal.cli.speech import AUDIO_OPT, SPEECH_MODEL_OPT

VLM_MODEL = typer.Option(
    None,
    "--model",
    "-m",
    help="A polymodal or transformers BLIP-2 directory, or a Flamingo (polymodal or transformers IDEFICS) "
    "directory (default: the embedded default VLM).",
)
MAX_NEW = typer.Option(30, "--max-new-tokens", min=1, help="At most this many new tokens per answer.")
BEAMS = typer.Option(1, "--num-beams", min=1, help="Beam search with this many beams (1: greedy).")


def _load(model: str | None):
    import polymodal

    return polymodal.load_vlm(model)


@command
def caption(
    target: Path = typer.Argument(..., help="An image file, or a folder whose images are all captioned."),
    model: str | None = VLM_MODEL,
    out: Path = typer.Option(
        Path("captions.jsonl"), "--out", "-o",
        help="Folder mode: the JSON-lines file to append {path, caption} to; a rerun skips what is there.",
    ),
    max_new_tokens: int = MAX_NEW,
    num_beams: int = BEAMS,
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Folder mode: images captioned together."),
    json_: bool = JSON,
) -> None:
    """Caption an image, or every image in a folder (resumable, batched, with a progress bar)."""
    if not target.exists():
        raise FileNotFoundError(f"{target}: no such file or directory")
    vlm = _load(model)
    gen = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
    if target.is_file():
        text = vlm.caption(target, **gen)
        return _emit({"image": str(target), "caption": text}) if json_ else typer.echo(text)
    result = vlm.caption_folder(target, out, batch_size=batch_size, progress=_progress(),
                                on_error=lambda p, message: say(f"skipped: {message}"), **gen)
    if result["skipped"] and not result["captioned"] and not result["already_done"]:
        raise ValueError(f"none of the {result['images']} images in {target} could be read")
    if json_:
        return _emit(result)
    typer.echo(f"{result['captioned']} captioned, {result['already_done']} already done, "
               f"{len(result['skipped'])} skipped -> {result['out']}")


IMAGES_OPT = typer.Option(None, "--image", "-i", help="An image; repeat for several (a Flamingo model).")
VIDEO_OPT = typer.Option(None, "--video", help="A clip: a GIF or a folder of frames (a Flamingo model).")


def _is_flamingo(vlm) -> bool:
    return hasattr(vlm, "video_frames")


@command
def ask(
    args: list[str] = typer.Argument(None, metavar="[IMAGE] QUESTION",
                                     help="An image file and the question, or the question alone with "
                                          "--image / --video. A Flamingo reads <image> markers in the "
                                          "question as an interleaved prompt. With --audio: the question "
                                          "about the clip, or none to answer what was said."),
    model: str | None = VLM_MODEL,
    images: list[Path] = IMAGES_OPT,
    video: Path = VIDEO_OPT,
    shots: Path = typer.Option(None, "--shots", help="Few-shot examples before the question: JSON lines of "
                                                     "{image or video, question, answer} (a Flamingo model)."),
    max_new_tokens: int = MAX_NEW,
    num_beams: int = BEAMS,
    audio: Path = AUDIO_OPT,
    speech_model: Path = SPEECH_MODEL_OPT,
    json_: bool = JSON,
) -> None:
    """Answer one question about an image (a Flamingo: several images, a video, few-shot examples), or
    about a clip of speech (--audio: through --speech-model, a speech bridge, or else transcribed)."""
    if audio is not None or speech_model is not None:
        from polymodal.cli.speech import ask_audio

        return ask_audio(audio, speech_model, args or [], max_new_tokens=max_new_tokens, num_beams=num_beams,
                         json_=json_)
    args = args or []
    if not args:
        raise ValueError("give [IMAGE] QUESTION (or --audio CLIP [QUESTION])")
    if len(args) > 2:
        raise ValueError(f"give [IMAGE] QUESTION, got {len(args)} arguments (quote the question)")
    question = args[-1]
    images = ([Path(args[0])] if len(args) == 2 else []) + list(images or [])
    if not question.strip():
        raise ValueError("the question is empty: give some text")
    vlm = _load(model)
    gen = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
    if _is_flamingo(vlm):
        answer = vlm.ask(images, question, video=video, shots=shots, **gen)
    else:
        if video is not None or shots is not None or len(images) != 1:
            raise ValueError("a BLIP-2 model answers about exactly one image (--video, --shots and several "
                             "images need a Flamingo model)")
        answer = vlm.ask(images[0], question, **gen)
    if json_:
        doc = {"image": str(images[0])} if len(images) == 1 else {"images": [str(i) for i in images]}
        if video is not None:
            doc["video"] = str(video)
        return _emit({**doc, "question": question, "answer": answer})
    typer.echo(answer)


@command
def chat(
    image: Path = typer.Argument(None, help="An image to talk about (optional; /image PATH sets one later)."),
    model: str | None = VLM_MODEL,
    images: list[Path] = IMAGES_OPT,
    video: Path = VIDEO_OPT,
    max_new_tokens: int = MAX_NEW,
    speak: bool = typer.Option(False, "--speak", help="Also read each answer aloud through espeak-ng."),
    audio: Path = AUDIO_OPT,
    speech_model: Path = SPEECH_MODEL_OPT,
) -> None:
    """A terminal chat, one message per line on stdin, the answers streamed to stdout.
    Commands: /image PATH, /reset, /save PATH, /quit. With a Flamingo, /image adds an image to the
    conversation where it stands (the questions after it are about it) and /video PATH a clip.
    With --audio or --speech-model, turns may be spoken: --audio is answered first, /audio PATH adds a
    spoken turn (through the speech bridge, or without one transcribed by Whisper for the LLM)."""
    if audio is not None or speech_model is not None:
        from polymodal.cli.speech import chat_audio

        return chat_audio(audio, speech_model, max_new_tokens=max_new_tokens, speak=speak)
    vlm = _load(model)
    if _is_flamingo(vlm):
        firsts = ([image] if image else []) + list(images or [])
        session = vlm.chat(firsts, video=video, on_note=lambda m: say(f"note: {m}"), max_new_tokens=max_new_tokens)
    elif images or video is not None:
        raise ValueError("a BLIP-2 model talks about one image (--image, --video need a Flamingo model)")
    else:
        session = vlm.chat(image, on_note=lambda m: say(f"note: {m}"), max_new_tokens=max_new_tokens)
    say("chat: /image PATH, /reset, /save PATH, /quit" + (f" (image: {image})" if image else ""))

    def answer(line: str) -> None:
        nonlocal speak
        text = session.send(line, stream=lambda piece: typer.echo(piece, nl=False))
        typer.echo("")
        if speak:  # read aloud; a missing espeak-ng or sound device is said once, then speaking stops
            from polymodal.cli.audio import speak_aloud

            if problem := speak_aloud(text):
                say(f"note: {problem}")
                speak = False

    def set_image(arg: str) -> str:
        session.set_image(Path(arg))
        return f"(image: {arg}; conversation reset)"

    def add_image(arg: str) -> str:
        session.add_image(Path(arg))
        return f"(image added: {arg})"

    def add_video(arg: str) -> str:
        session.add_video(Path(arg))
        return f"(video added: {arg})"

    commands = {"/image": add_image, "/video": add_video} if _is_flamingo(vlm) else {"/image": set_image}
    chat_loop(session, answer, commands)
