"""Commands over the shared space: patches, preprocess, embed, similarity, classify, convert, demo."""

from __future__ import annotations

from pathlib import Path

import typer

from polymodal.cli import IMAGES, JSON, MODEL, TEXTS, _console, _emit, _progress, command, say
from polymodal.config import ImageTransformConfig
from polymodal.processing.image import ImageError, load_image


def _load(model: str, **options):
    import polymodal

    return polymodal.load(model, **options)


def _save(image, out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        image.save(out)
    except ValueError as e:  # Pillow: "unknown file extension"
        raise ValueError(
            f"{out}: cannot write a picture there ({str(e).strip(': ')}; try a .png name)"
        ) from None
    return str(out)


def _embed_images(embedder, paths: list) -> tuple:
    """(BatchResult, skipped [{input, error}]): a bad image in a batch is named on stderr and
    skipped; a single bad image, or a batch with no good one, raises."""

    def skip(i: int, message: str) -> None:
        if len(paths) > 1:
            say(f"skipped: {message}")

    result = embedder.embed_images([str(p) for p in paths], progress=_progress(), on_error=skip)
    skipped = [{"input": str(paths[i]), "error": message} for i, message in result.errors]
    if not result.ok:
        raise ImageError(
            result.errors[0][1] if len(paths) == 1 else f"none of the {len(paths)} images could be read"
        )
    return result, skipped


def _embed_texts(embedder, texts: list[str]):
    """(M, D); a text longer than the context is embedded from its start, with a warning."""
    from polymodal.tasks.embed import check_text

    tok = embedder.tokenizer
    for i, text in enumerate(texts):
        check_text(text, i)
        if len(tok.encode_batch([text], tok.context_length + 1)[0]) > tok.context_length:
            preview = " ".join(text[:40].split())
            say(
                f"warning: text {i + 1} ({preview!r}…, {len(text):,} characters) is longer than "
                f"{tok.context_length} tokens; only its first {tok.context_length} tokens are embedded"
            )
    return embedder.encode_text(texts, progress=_progress())


def _short(paths: list[str]) -> list[str]:
    """File names for a table, or the paths as given when two names are the same."""
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else paths


def _table(title: str, matrix, rows: list[str], cols: list[str]):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    table.add_column("", no_wrap=True)
    for c in cols:
        table.add_column(escape(c if len(c) <= 40 else c[:39] + "…"), justify="right")
    for name, row in zip(rows, matrix, strict=True):
        table.add_row(escape(name), *(f"{v:.3f}".replace("-0.000", "0.000") for v in row))
    return table


# --- commands -----------------------------------------------------------------------------------


@command
def patches(
    image: Path = typer.Argument(..., help="An image file."),
    patch_size: int = typer.Option(16, "--patch-size", "-p", min=1, help="Patch side in pixels."),
    size: int = typer.Option(224, "--size", min=1, help="The side the image is resized and cropped to."),
    out: Path = typer.Option(Path("patches.png"), "--out", "-o", help="Where to write the PNG."),
    json_: bool = JSON,
) -> None:
    """Draw how a ViT cuts an image into numbered patches and reads them as a sequence."""
    from polymodal.viz import draw_patches

    cfg = ImageTransformConfig(size=size, resize=size)
    written = _save(draw_patches(load_image(image), patch_size, cfg), out)
    n = (size // patch_size) ** 2
    if json_:
        return _emit({"out": written, "patches": n, "patch_size": patch_size, "size": size})
    typer.echo(f"{n} patches of {patch_size}x{patch_size} -> {written}")


@command
def preprocess(
    image: Path = typer.Argument(..., help="An image file."),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="Use this checkpoint's image transform (default: CLIP's 224 px centre crop).",
    ),
    mode: str = typer.Option(None, "--mode", help="crop, letterbox or squash (default: the model's)."),
    out: Path = typer.Option(
        Path("preprocess.png"), "--out", "-o", help="Where to write the side-by-side picture."
    ),
    seen: Path = typer.Option(None, "--seen", help="Also write the bare image the model sees here."),
    json_: bool = JSON,
) -> None:
    """Show an image beside what the model sees after resizing and cropping."""
    from polymodal.processing.image import to_pil, transform
    from polymodal.viz import draw_preprocess

    cfg = _load(model).transform if model else ImageTransformConfig()
    cfg = cfg.replace(mode=mode) if mode else cfg
    original = load_image(image)
    view = to_pil(transform(original, cfg), cfg)
    written = {"out": _save(draw_preprocess(original, view, cfg), out)}
    if seen:
        written["seen"] = _save(view, seen)
    if json_:
        return _emit({**written, "original": list(original.size), "size": cfg.size, "mode": cfg.mode})
    typer.echo(
        f"{original.width}x{original.height} -> {cfg.size}x{cfg.size} ({cfg.mode}): "
        + ", ".join(written.values())
    )


@command
def embed(
    model: str = MODEL,
    image: list[Path] = IMAGES,
    text: list[str] = TEXTS,
    out: Path = typer.Option(Path("embeddings.npy"), "--out", "-o", help="The .npy file to write."),
    int8: bool = typer.Option(False, "--int8", help="Int8 dynamic quantization of the Linear layers (CPU only; "
                              "faster, embeddings within cosine 0.99 of fp32)."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the towers (slow first batch; "
                                  "pays off on large jobs)."),
    json_: bool = JSON,
) -> None:
    """Embed images or texts into a float32 (N, D) .npy of L2-normalised rows."""
    import numpy as np

    if bool(image) == bool(text):
        raise ValueError("give --image or --text (one kind per run)")
    embedder = _load(model, int8=int8, compile=compile_)
    skipped = []
    if image:
        result, skipped = _embed_images(embedder, image)
        vectors = result.vectors
    else:
        vectors = _embed_texts(embedder, text)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, vectors.astype(np.float32))
    if json_:
        return _emit({"shape": list(vectors.shape), "out": str(out), "skipped": skipped})
    typer.echo(
        f"{vectors.shape[0]} x {vectors.shape[1]} float32 -> {out}"
        + (f" ({len(skipped)} skipped)" if skipped else "")
    )


@command
def similarity(
    model: str = MODEL,
    image: list[Path] = IMAGES,
    text: list[str] = TEXTS,
    plot: Path = typer.Option(None, "--plot", help="Also draw the matrix as a heatmap PNG."),
    json_: bool = JSON,
) -> None:
    """Cosine similarity of images (rows) and texts (columns), and each image's probabilities over the texts."""
    if not image or not text:
        raise ValueError("give at least one --image and one --text")
    embedder = _load(model)
    result, skipped = _embed_images(embedder, image)
    texts = _embed_texts(embedder, text)
    cosine, probs = embedder.similarity(result.vectors, texts), embedder.probs(result.vectors, texts)
    rows = [str(image[i]) for i in result.ok]
    if plot:
        from polymodal.viz import draw_similarity

        thumbs = [load_image(image[i]) for i in result.ok]
        plot = _save(draw_similarity(cosine, rows, text, thumbs, "cosine similarity"), plot)
    if json_:
        return _emit(
            {
                "images": rows,
                "texts": text,
                "cosine": cosine.tolist(),
                "probs": probs.tolist(),
                "skipped": skipped,
                "plot": plot and str(plot),
            }
        )
    console = _console()
    console.print(_table("cosine similarity", cosine, _short(rows), text))
    console.print(_table("probability of each text, per image", probs, _short(rows), text))
    if plot:
        typer.echo(f"heatmap -> {plot}")


def _read_members(path: Path) -> dict[str, list[str]]:
    """{label: [member names]} from a JSON file, checked, with a one-line error naming the problem."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--members {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or not data or not all(
            isinstance(v, list) and v and all(isinstance(n, str) and n.strip() for n in v) for v in data.values()):
        raise ValueError(f"--members {path}: expected {{label: [names, ...]}} with at least one name per label")
    return {str(k): [n.strip() for n in v] for k, v in data.items()}


@command
def classify(
    images: list[Path] = typer.Argument(..., help="Image files (a bad one is skipped)."),
    model: str = MODEL,
    labels: str = typer.Option(None, "--labels", "-l", help="Comma-separated: 'cat,dog,car'."),
    members: Path = typer.Option(None, "--members", help="A JSON file {label: [names of things it holds]}: "
                                 "labels found by their members' votes (the labels are its keys)."),
    template: str = typer.Option("a photo of a {}.", "--template", help="'{}' becomes the label (or member name)."),
    top: int = typer.Option(3, "--top", "-k", min=1, help="How many labels to show per image."),
    json_: bool = JSON,
) -> None:
    """Zero-shot classification: each image's most probable labels."""
    groups = _read_members(members) if members else None
    names = [label.strip() for label in (labels or "").split(",") if label.strip()] or list(groups or ())
    if not names:
        raise ValueError("--labels: no labels (give them comma-separated, 'cat,dog,car', or --members FILE)")
    if "{}" not in template:
        raise ValueError(f"--template {template!r} has no '{{}}' for the label")
    embedder = _load(model)
    result, skipped = _embed_images(embedder, images)
    _embed_texts(embedder, [template.format(n) for n in names])  # warns about over-long prompts
    ranked = [r[:top] for r in embedder.zero_shot(result.vectors, names, template, members=groups)]
    files = [str(images[i]) for i in result.ok]
    if json_:
        return _emit(
            {
                "results": [
                    {"image": f, "labels": [{"label": la, "prob": p} for la, p in r]}
                    for f, r in zip(files, ranked, strict=True)
                ],
                "skipped": skipped,
            }
        )
    from rich.markup import escape
    from rich.table import Table

    table = Table("image", "label", "probability")
    for f, r in zip(_short(files), ranked, strict=True):
        for k, (la, p) in enumerate(r):
            table.add_row(escape(f) if k == 0 else "", escape(la), f"{p:.3f}")
    _console().print(table)


@command
def convert(
    src: str = typer.Argument(..., help="A checkpoint in any layout polymodal reads."),
    dst: Path = typer.Argument(..., help="The directory to write polymodal's own format into."),
    act: str = typer.Option(
        None, "--act", help="quick_gelu or gelu, for bare OpenCLIP weights (their shapes cannot tell)."
    ),
    json_: bool = JSON,
) -> None:
    """Convert a checkpoint (transformers or OpenCLIP CLIP, a GGUF language model, a CTranslate2 or transformers
    Whisper) to polymodal's own format."""
    if src.endswith(".gguf"):
        from polymodal.checkpoints.gguf import convert_gguf

        out = convert_gguf(src, dst)
    elif _is_whisper(Path(src)):  # CTranslate2 (model.bin) or transformers Whisper -> our Whisper format
        from polymodal.tasks.asr import load_whisper, save_whisper

        out = save_whisper(*load_whisper(src), dst)
    else:
        from polymodal.checkpoints.pretrained import convert as run_convert

        out = run_convert(src, dst, act=act)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    if json_:
        return _emit({"out": str(out), "files": files})
    typer.echo(f"wrote {out}: " + ", ".join(f"{k} ({v / 1e6:.1f} MB)" for k, v in files.items()))


def _is_whisper(path: Path) -> bool:
    import json

    cfg = path / "config.json"
    return path.is_dir() and ((path / "model.bin").is_file() or (
        cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "whisper"))


@command
def demo(
    out: Path = typer.Option(Path("out"), "--out", "-o", help="The directory to write into."),
    model: str = MODEL,
    random: bool = typer.Option(False, "--random", help="Only the machinery, with a small RANDOM model (fast, offline)."),
    emoji_limit: int = typer.Option(2000, "--emoji-limit", min=1, help="Apple-style emoji in the collection (all: 1,903)."),
    clipart_limit: int = typer.Option(1500, "--clipart-limit", min=10, help="Clip art pictures drawn "
                                      "(about a tenth are held-out subjects, which the collection keeps)."),
    json_: bool = JSON,
) -> None:
    """The default CLIP on a collection it never trained on: searches, zero-shot, report.html."""
    if random:
        return _random_demo(out, json_)
    from polymodal.showcase import run_showcase

    report = run_showcase(out, model=model, emoji_limit=emoji_limit, clipart_limit=clipart_limit,
                          progress=_progress(), on_note=say)
    if json_:
        return _emit({"out": str(out), "report": str(out / "report.html"), "images": report["images"],
                      "index": report["index"], "searches": {q: [r["caption"] for r in rs] for q, rs in report["searches"].items()},
                      "zero_shot": [{k: z[k] for k in ("caption", "category", "source", "heldout", "labels")}
                                    for z in report["zero_shot"]]})
    console = _console()
    from rich.markup import escape
    from rich.table import Table

    table = Table("query", "top results (score)", title=f"text search over {report['images']} unseen images")
    for query, results in report["searches"].items():
        table.add_row(escape(query), escape(", ".join(f"{r['caption']} ({r['score']:.2f})" for r in results[:3])))
    console.print(table)
    q = report["image_search"]
    console.print(f"image search with {q['query']['caption']}: "
                  + ", ".join(f"{r['caption']} ({r['score']:.2f})" for r in q["results"][:3]))
    for z in report["zero_shot"][:4]:
        console.print(f"zero-shot {z['caption']}: " + ", ".join(f"{lab} {p:.2f}" for lab, p in z["labels"]))
    typer.echo(f"report -> {out / 'report.html'}")


def _random_demo(out: Path, json_: bool) -> None:
    console = _console()
    warning = (
        "The model is small and randomly initialised: its similarities are meaningless. "
        "This shows the machinery (patches, preprocessing, embedding, similarity), not a trained CLIP."
    )
    if json_:
        say(f"note: {warning}")
    else:
        console.print(f"[bold yellow]NOTE:[/] {warning}")
    from polymodal.demo import run_random_demo

    report = run_random_demo(out, progress=_progress(), on_note=say)
    if json_:
        return _emit({"warning": warning, **report})
    title = "cosine similarity (random model: meaningless)"
    console.print(_table(title, report["cosine"], report["images"], report["texts"]))
    typer.echo("wrote:\n" + "\n".join(f"  {p}" for p in report["files"]))


