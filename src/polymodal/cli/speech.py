"""`polymodal ask --audio` and `polymodal chat --audio`: the speech bridge behind the VLM commands
(cli/vlm.py hands them over here when --audio or --speech-model is given). Without --speech-model
the pipeline answers: Whisper transcribes, the LLM reads the transcript (tasks/speech_chat.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from polymodal.cli import _emit, chat_loop, say

AUDIO_OPT = typer.Option(None, "--audio", "-a", help="A clip of speech: the question itself, or what a question "
                         "is about (through --speech-model, or else transcribed by Whisper for the LLM).")
SPEECH_MODEL_OPT = typer.Option(None, "--speech-model", help="A speech bridge directory (`polymodal train speech` "
                                "writes one) that reads --audio into the LLM.")


def _load(speech_model: Path | None):
    import polymodal

    if speech_model is None:
        from polymodal.tasks.speech_chat import TranscriptChat

        say("note: no --speech-model: Whisper transcribes the speech and the LLM reads the transcript")
        return TranscriptChat.default()
    return polymodal.load_speech_chat(speech_model)


def ask_audio(audio: Path | None, speech_model: Path | None, args: list[str], *, max_new_tokens: int,
              num_beams: int, json_: bool) -> None:
    if audio is None:
        raise ValueError("--speech-model answers about a clip: give --audio CLIP")
    if len(args) > 1:
        raise ValueError(f"with --audio give at most one QUESTION, got {len(args)} arguments (quote the question)")
    question = args[0].strip() if args else None
    if args and not question:
        raise ValueError("the question is empty: give some text, or none to answer what was said")
    from polymodal.tasks.speech_chat import load_speech

    _, wave = load_speech(audio)  # a bad clip is refused before the model loads
    chat = _load(speech_model)
    answer = chat.ask(wave, question, max_new_tokens=max_new_tokens, num_beams=num_beams)
    if json_:
        return _emit({"audio": str(audio), "question": question, "answer": answer})
    typer.echo(answer)
    return None


def chat_audio(audio: Path | None, speech_model: Path | None, *, max_new_tokens: int, speak: bool) -> None:
    """The terminal chat with spoken turns: --audio is answered first; then a line is a typed turn and
    /audio PATH a spoken one."""
    from polymodal.cli.audio import speak_aloud
    from polymodal.tasks.speech_chat import load_speech

    if audio is not None:
        load_speech(audio)  # a bad clip is refused before the model loads
    chat = _load(speech_model)
    session = chat.chat(on_note=lambda m: say(f"note: {m}"), max_new_tokens=max_new_tokens)
    say("chat: /audio PATH, /reset, /save PATH, /quit" + (f" (audio: {audio})" if audio else ""))

    def answer(**turn) -> None:
        nonlocal speak
        text = session.send(stream=lambda piece: typer.echo(piece, nl=False), **turn)
        typer.echo("")
        if speak and (problem := speak_aloud(text)):
            say(f"note: {problem}")
            speak = False

    def spoken(arg: str) -> None:
        answer(audio=Path(arg))

    if audio is not None:
        answer(audio=audio)
    chat_loop(session, lambda line: answer(text=line), {"/audio": spoken})
