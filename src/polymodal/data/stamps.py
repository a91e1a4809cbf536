"""Tux Paint's stamps (Debian's tuxpaint-stamps-default, GPL-2): about 800 pictures of things,
many of them photographs cut out on transparency (a husky, a lion, a blackbird, an orange, a
traffic cone), the rest drawings, each with a one-line English description written for
children ("A white kitten.") and filed by subject (`animals/mammals/cats/kitten.svg`).

They are the one source of photographs of things here: emoji, icons and clip art are all
drawn. The package is fetched like the clip art (`fetch_deb`: `apt-get download` into the
cache, SHA-256 pinned, `dpkg -x`); SVG stamps are rasterised with cairosvg, and every picture
is composited onto white, cropped to its content and downscaled to fit `size`.

Captions: the description's first sentence, the subject (the file name without counters:
`lion-2` -> "lion", `tiger_sumatran` -> "tiger sumatran") and "<folder>: <subject>". The
letters of the alphabets are left out. The test split holds out whole subjects (by a hash of the
subject), and every subject that names a held-out emoji or held-out clip art, so a mixture of
these sets holds those things out everywhere.
"""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

from PIL import Image

from polymodal.data.common import (
    CAPTIONS,
    SourceError,
    article,
    cache_dir,
    check_build,
    crop_white,
    dedupe,
    fetch_deb,
    held_out_names,
    load_drawing,
    on_white,
    save_png,
    split_beside,
    summarise,
    take,
    track,
    unit_hash,
    write_jsonl,
    write_readme,
)
from polymodal.processing.image import ImageError

PACKAGE = "tuxpaint-stamps-default"
VERSION = "2022.06.04-1"
SHA256 = "6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34"
POOL_URL = ("http://deb.debian.org/debian/pool/main/t/tuxpaint-stamps/"
            "tuxpaint-stamps-default_2022.06.04-1_all.deb")
LICENCE = "GPL-2 (Tux Paint stamps, (c) the Tux Paint contributors, per the Debian package's copyright file)"
URL = "https://tuxpaint.org/download/stamps/"
SPLIT_SALT = "stamps-v1"
LEFT_OUT = ("symbols/alphabets",)  # letters, not things
FOLDER_WORDS = {"cartoon", "00_symbols", "filled", "outlined", "uppercase", "lowercase"}  # not what a stamp is


def subject_of(stem: str, folder: str = "") -> str:
    """'lion-2' -> 'lion'; 'tiger_sumatran' -> 'tiger sumatran'; '100sacagawea' -> 'sacagawea';
    a stem of digits only ('050' in coins/) takes its folder's word."""
    words = [w for w in re.split(r"[\s_\-]+", re.sub(r"\d+", " ", stem.lower())) if len(w) > 1 or w == "a"]
    return " ".join(words).strip() or folder or stem.lower()


def first_sentence(description: str) -> str:
    """'A US 5 cent piece ($.05) called a nickel.' -> 'a us 5 cent piece ($.05) called a nickel'."""
    text = " ".join(description.replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"').split())
    text = re.split(r"(?<=[a-z)\"'])\. ", text, maxsplit=1)[0]
    return text.rstrip(". ").lower()


def captions_for(subject: str, description: str, folder: str) -> list[str]:
    return dedupe([t for t in (description, subject, f"a picture of {article(subject)}",
                               f"{folder}: {subject}" if folder else "") if t])


def _folder_word(parts: tuple[str, ...]) -> str:
    kept = [p.replace("_", " ") for p in parts if p not in FOLDER_WORDS]
    return kept[-1] if kept else ""


def _description(txt: Path) -> str:
    """The English line of a stamp's description file (the first, the one without a locale)."""
    for line in txt.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip() and "=" not in line.split(" ", 1)[0]:
            return line.strip()
    return ""


def _stamps(root: Path) -> dict[str, Path]:
    """{relative stem: picture} of every stamp, a PNG preferred to an SVG of the same stem."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.suffix not in (".png", ".svg") or any(str(rel).startswith(p) for p in LEFT_OUT):
            continue
        stem = str(rel.with_suffix(""))
        if stem not in found or path.suffix == ".png":
            found[stem] = path
    return found


def _render(path: Path, size: int) -> Image.Image:
    if path.suffix == ".png":
        return load_drawing(path, size)
    import cairosvg

    try:
        png = cairosvg.svg2png(url=str(path), output_width=size * 2)
    except (ValueError, MemoryError, OSError) as e:  # a broken SVG: the caller reports it
        raise ImageError(f"{path.name}: {' '.join(str(e).split()) or type(e).__name__}") from None
    image = crop_white(on_white(Image.open(io.BytesIO(png))))
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def build_stamps(out, *, cache=None, size: int = 256, progress: bool = False, limit: int | None = None) -> dict:
    """Build the stamp caption set in `out`; return counts per split and category.

    `limit`: at most this many stamps, spread over both splits."""
    try:
        import cairosvg  # noqa: F401  (the SVG stamps need it)
    except (ImportError, OSError) as e:
        raise SourceError(f"the SVG stamps need cairosvg and the cairo library: pip install cairosvg; "
                          f"apt-get install libcairo2 ({e})") from None
    started = time.perf_counter()
    out, cache = Path(out), cache_dir(cache)
    folder = fetch_deb(PACKAGE, VERSION, SHA256, POOL_URL, cache,
                       {"tuxpaint/stamps": "stamps", f"doc/{PACKAGE}/copyright": "copyright"})
    root = folder / "stamps"
    held = held_out_names(cache)
    entries = {}
    for stem, path in _stamps(root).items():
        parts = Path(stem).parts
        txt = path.with_suffix(".txt")
        folder_word = _folder_word(parts[:-1])
        subject = subject_of(parts[-1], folder_word)
        description = first_sentence(_description(txt)) if txt.exists() else ""
        entries[stem] = (path, subject, description, parts[0], folder_word, split_beside(subject, held, salt=SPLIT_SALT))
    order = sorted(entries, key=lambda s: (unit_hash(f"stamp:{s}"), s))
    chosen = take(order, limit, lambda s: entries[s][5] == "test")

    check_build(out, "stamps", {"size": size})
    records, skipped, written = [], [], 0
    for stem in track(chosen, f"stamps: {len(chosen)} pictures", progress):
        path, subject, description, category, folder_word, split = entries[stem]
        rel = f"images/{stem}.png"
        if not (out / rel).exists():
            try:
                save_png(_render(path, size), out / rel)
                written += 1
            except (ImageError, OSError, ValueError) as e:  # a bad picture: report, go on
                skipped.append(f"{stem}: {e}")
                continue
        for text in captions_for(subject, description, folder_word):
            records.append({"image": rel, "text": text, "split": split, "name": subject, "category": category,
                            "folder": str(Path(stem).parent), "source": PACKAGE})
    records.sort(key=lambda r: (r["image"], r["text"]))
    write_jsonl(out / CAPTIONS, records)
    summary = summarise(records, by=("category",))
    write_readme(
        out, title="Tux Paint stamp caption set (polymodal)",
        about=f"Tux Paint's stamps of things (photographs cut out on transparency and drawings), on white, at "
              f"most {size} pixels a side, each captioned by its English description, its subject and its folder. "
              "The test split holds out whole subjects (about 10%, by a SHA-256 hash of the subject) and every "
              "subject that names a held-out emoji or held-out clip art.",
        sources=[{"name": f"{PACKAGE} (Debian)", "version": VERSION, "url": URL, "licence": LICENCE,
                  "terms": f"SHA-256 {SHA256}"}],
        summary=summary,
        notes=["The letters of the alphabets are left out; a stamp with both a PNG and an SVG is taken once, as PNG.",
               "Built with `polymodal.data.stamps.build_stamps`" + (f" (limit={limit})." if limit is not None else ".")],
    )
    summary.update(written=written, skipped=skipped, version=VERSION,
                   seconds=round(time.perf_counter() - started, 2), out=str(out))
    return summary
