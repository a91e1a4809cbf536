"""Commands that build real image-caption data sets: emoji, icons, clipart, stamps, scenes, clips; and show."""

from __future__ import annotations

from pathlib import Path

import typer

from polymodal.cli import JSON, _emit, _progress, app, command

data_app = typer.Typer(help="Build image-caption data sets (folder + captions.jsonl) and look at them.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
OUT = typer.Argument(..., help="The folder to write (a rerun reuses what is there).")
CACHE = typer.Option(None, "--cache", help="Download cache (default: $POLYMODAL_CACHE or ~/.cache/polymodal).")
LIMIT = typer.Option(None, "--limit", min=1, help="Build only this many items (a quick subset).")


def _report(summary: dict, out: Path, json_: bool) -> None:
    if json_:
        return _emit({"out": str(out), **summary})
    splits = ", ".join(f"{k} {v}" for k, v in summary.get("splits", {}).items())
    typer.echo(f"{summary.get('images', '?')} images, {summary.get('captions', '?')} captions"
               + (f" ({splits})" if splits else "") + f" -> {out}")


@command(name="emoji", group=data_app)
def emoji(
    out: Path = OUT,
    style: list[str] = typer.Option(["google", "twitter", "openmoji"], "--style",
                                    help="google, twitter, openmoji, apple (evaluation only), and from Iconify: fluent, fluentcolor, "
                                         "fluentmono, emojione, emojionev1, emojionemono, notov1, fxemoji, streamline; repeatable."),
    size: int = typer.Option(64, "--size", min=8, help="Image side in pixels."),
    cache: Path = CACHE,
    limit: int = LIMIT,
    json_: bool = JSON,
) -> None:
    """Emoji from npm (emoji-datasource-*, openmoji) with captions from names, tags and categories."""
    from polymodal.data.emoji import build_emoji

    _report(build_emoji(out, styles=tuple(style), cache=cache, size=size, progress=_progress(), limit=limit),
            out, json_)


@command(name="icons", group=data_app)
def icons(
    out: Path = OUT,
    set_: list[str] = typer.Option(["mdi"], "--set", help="mdi, game-icons, icon-park, fa6-solid; repeatable."),
    size: int = typer.Option(64, "--size", min=8, help="Image side in pixels."),
    cache: Path = CACHE,
    limit: int = LIMIT,
    json_: bool = JSON,
) -> None:
    """Icons of things from Iconify's npm packages (Material Design Icons, game-icons.net, IconPark, Font
    Awesome), black on white, captioned by name and category."""
    from polymodal.data.icons import build_icons

    _report(build_icons(out, sets=tuple(set_), cache=cache, size=size, progress=_progress(), limit=limit),
            out, json_)


@command(name="clipart", group=data_app)
def clipart(
    out: Path = OUT,
    size: int = typer.Option(256, "--size", min=16, help="Shrink images to at most this side (0: keep)."),
    per_category_cap: int = typer.Option(400, "--per-category-cap", help="Balance: at most this many per category."),
    cache: Path = CACHE,
    limit: int = LIMIT,
    json_: bool = JSON,
) -> None:
    """Debian's openclipart-png (public domain), captioned from categories and cleaned subject names."""
    from polymodal.data.clipart import build_clipart

    summary = build_clipart(out, cache=cache, size=size or None, per_category_cap=per_category_cap or None,
                            progress=_progress(), limit=limit)
    _report(summary, out, json_)


@command(name="stamps", group=data_app)
def stamps(
    out: Path = OUT,
    size: int = typer.Option(256, "--size", min=16, help="Shrink pictures to at most this side."),
    cache: Path = CACHE,
    limit: int = LIMIT,
    json_: bool = JSON,
) -> None:
    """Debian's tuxpaint-stamps-default (GPL-2): photographs and drawings of things, captioned by their descriptions."""
    from polymodal.data.stamps import build_stamps

    _report(build_stamps(out, cache=cache, size=size, progress=_progress(), limit=limit), out, json_)


@command(name="scenes", group=data_app)
def scenes(
    out: Path = OUT,
    n: int = typer.Option(1000, "--n", min=1, help="How many scenes."),
    seed: int = typer.Option(0, "--seed", help="The same seed gives the same bytes."),
    size: int = typer.Option(128, "--size", min=16, help="Image side in pixels."),
    json_: bool = JSON,
) -> None:
    """Generated scenes of coloured shapes with captions and question-answer pairs."""
    from polymodal.data.scenes import build_scenes

    _report(build_scenes(out, n=n, seed=seed, size=size, progress=_progress()), out, json_)


@command(name="clips", group=data_app)
def clips(
    out: Path = OUT,
    n: int = typer.Option(100, "--n", min=1, help="How many clips."),
    frames: int = typer.Option(8, "--frames", min=2, help="Frames per clip."),
    seed: int = typer.Option(0, "--seed"),
    size: int = typer.Option(64, "--size", min=16),
    json_: bool = JSON,
) -> None:
    """Short clips of moving shapes with captions (for video models)."""
    from polymodal.data.scenes import build_clips

    _report(build_clips(out, n=n, frames=frames, seed=seed, size=size, progress=_progress()), out, json_)


@command(name="show", group=data_app)
def show(
    folder: Path = typer.Argument(..., help="A data set folder."),
    out: Path = typer.Option(Path("sheet.png"), "--out", "-o", help="The contact sheet PNG."),
    n: int = typer.Option(24, "--n", min=1, help="How many random samples."),
    seed: int = typer.Option(0, "--seed"),
    split: str = typer.Option(None, "--split", help="Only this split."),
    json_: bool = JSON,
) -> None:
    """Draw a contact sheet of random samples with their captions."""
    from polymodal.data.sheet import contact_sheet

    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(folder, n=n, seed=seed, split=split).save(out)
    if json_:
        return _emit({"out": str(out)})
    typer.echo(f"contact sheet -> {out}")


@command(name="mix", group=data_app)
def mix_cmd(
    out: Path = typer.Argument(..., help="The folder of the mixture."),
    source: list[str] = typer.Option(..., "--source", "-s", help="NAME=FOLDER of a data set; repeatable."),
    repeat: list[str] = typer.Option([], "--repeat", help="NAME=K: write that source's training records K times; "
                                                          "repeatable."),
    json_: bool = JSON,
) -> None:
    """Combine several folder data sets into one (links, no copies), records tagged by source."""
    from polymodal.data.mix import mix

    pairs = dict(s.split("=", 1) if "=" in s else ("", s) for s in source)
    repeats = {}
    for r in repeat:
        name, _, times = r.partition("=")
        if not times.isdigit():
            raise typer.BadParameter(f"--repeat {r!r}: expected NAME=K with K a whole number")
        repeats[name] = int(times)
    counts = mix(out, pairs, repeats)
    if json_:
        return _emit({"out": str(out), "records": counts})
    typer.echo(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" -> {out}")
