"""Named icons: Material Design Icons (Apache-2.0), monochrome glyphs of things ("food-apple",
"bicycle", "screwdriver") filed in 61 categories, drawn black on white with their names as
captions. They widen what the image tower has seen a picture of, in a style no emoji has.

Source: the npm package `@iconify-json/mdi` (Iconify's packaging: `icons.json` holds each icon's
SVG body by name, `metadata.json` its categories), pinned by version and integrity hash and
rasterised with cairosvg.

Only the categories of things are kept (animals, food, tools, vehicles, sport, ...), not user
interface glyphs (arrows, cursors, text formatting); and of those, not the variants that add a
badge ("car-off", "car-plus", "car-search"). "-outline" and "-variant" drawings keep the name of
what they draw. The test split holds out whole subjects (by a hash of the name, as the other
builders do), and also every icon whose subject is the name of a held-out emoji or the subject
of held-out clip art, so a mixture of these sets holds those things out everywhere.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

from PIL import Image

from polymodal.data.common import (
    CAPTIONS,
    ICONIFY_FILES,
    SourceError,
    article,
    cache_dir,
    check_build,
    dedupe,
    fetch_npm,
    iconify_svg,
    on_white,
    save_png,
    split_of,
    summarise,
    take,
    track,
    unit_hash,
    write_jsonl,
    write_readme,
)

PACKAGE, VERSION = "@iconify-json/mdi", "1.2.3"
INTEGRITY = "sha512-O3cLwbDOK7NNDf2ihaQOH5F9JglnulNDFV7WprU2dSoZu3h3cWH//h74uQAB87brHmvFVxIOkuBX2sZSzYhScg=="
LICENCE = "Apache-2.0 (Material Design Icons, (c) Pictogrammers), through Iconify's packaging"
URL = "https://pictogrammers.com/library/mdi/"
SPLIT_SALT = "icons-v1"

# the categories of things, and how captions name them
CATEGORIES = {
    "Agriculture": "agriculture", "Animal": "animals", "Automotive": "cars", "Clothing": "clothing",
    "Drawing / Art": "art", "Emoji": "faces", "Food / Drink": "food & drink", "Gaming / RPG": "games",
    "Hardware / Tools": "tools", "Health / Beauty": "health & beauty", "Holiday": "holidays",
    "Home Automation": "home", "Medical / Hospital": "medicine", "Music": "music", "Nature": "nature",
    "People / Family": "people", "Places": "places", "Religion": "religion", "Science": "science",
    "Shopping": "shopping", "Sport": "sport", "Transportation + Flying": "flying",
    "Transportation + Other": "transport", "Transportation + Road": "road transport",
    "Transportation + Water": "boats", "Weather": "weather",
}
# a last word that adds a badge to the thing drawn, not another thing
BADGES = {"off", "plus", "minus", "remove", "alert", "check", "edit", "lock", "sync", "settings", "cog",
          "search", "refresh", "marker", "cancel", "clock", "star", "question", "multiple", "open",
          "arrow", "left", "right", "up", "down", "box", "circle", "outline-off", "heart", "network",
          "wireless", "connect", "export", "import", "key", "account", "cash", "pin", "eye", "percent"}
PLAIN = {"outline", "variant"}  # another drawing of the same thing


def subject_of(name: str) -> str | None:
    """'food-apple-outline' -> 'food apple'; 'car-off' -> None (a badge, not a thing)."""
    words = [w for w in name.split("-") if w not in PLAIN]
    if not words or any(w in BADGES for w in words[1:]) or re.search(r"\d", name):
        return None
    return " ".join(words)


def captions_for(subject: str, category: str) -> list[str]:
    """'food apple' -> 'food apple', 'an icon of a food apple', 'food & drink: food apple', ..."""
    return dedupe([subject, f"an icon of {article(subject)}", f"{category}: {subject}",
                   f"a black and white icon of {article(subject)}"])


def _held_out_names(cache: Path) -> set[str]:
    """The names of held-out emoji (from emoji-datasource, which the emoji builder fetches too).
    Held-out clip-art subjects need no list: `split_for` hashes a subject as the clip-art builder does."""
    from polymodal.data.emoji import emoji_records, emoji_split

    return {e["name"] for key, e in emoji_records(cache).items() if emoji_split(key) == "test"}


def split_for(subject: str, held: set[str]) -> str:
    from polymodal.data.clipart import SPLIT_SALT as CLIPART_SALT

    if subject in held or split_of(subject, salt=CLIPART_SALT) == "test":
        return "test"
    return split_of(subject, salt=SPLIT_SALT)


def build_icons(out, *, cache=None, size: int = 64, progress: bool = False, limit: int | None = None) -> dict:
    """Build the icon caption set in `out`; return counts per split and category.

    `limit`: at most this many icons, spread over the categories and both splits.
    """
    try:
        import cairosvg
    except (ImportError, OSError) as e:
        raise SourceError(f"icons are drawn from SVG and need cairosvg and the cairo library: pip install "
                          f"cairosvg; apt-get install libcairo2 ({e})") from None
    started = time.perf_counter()
    out, cache = Path(out), cache_dir(cache)
    folder = fetch_npm(PACKAGE, VERSION, INTEGRITY, cache, (*ICONIFY_FILES, "metadata.json"))
    data = json.loads((folder / "icons.json").read_text(encoding="utf-8"))
    filed = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))["categories"]
    category_of: dict[str, str] = {}
    for category, names in sorted(filed.items()):
        if category in CATEGORIES:
            for name in names:
                category_of.setdefault(name, CATEGORIES[category])
    held = _held_out_names(cache)
    entries = {}
    for name, icon in data["icons"].items():
        subject = subject_of(name)
        if subject and name in category_of and not icon.get("hidden"):
            entries[name] = (subject, category_of[name], split_for(subject, held))
    order = sorted(entries, key=lambda n: (unit_hash(f"icon:{n}"), n))
    chosen = take(order, limit, lambda n: entries[n][2] == "test")

    check_build(out, "icons", {"size": size})
    records, skipped, written = [], [], 0
    for name in track(chosen, f"icons: {len(chosen)} pictures", progress):
        subject, category, split = entries[name]
        rel = f"images/{name}.png"
        if not (out / rel).exists():
            try:
                png = cairosvg.svg2png(bytestring=iconify_svg(data, data["icons"][name]), output_width=size,
                                       output_height=size)
                save_png(on_white(Image.open(io.BytesIO(png))), out / rel)
                written += 1
            except (OSError, ValueError, AttributeError, MemoryError) as e:  # a bad icon: report, go on
                skipped.append(f"{name}: {' '.join(str(e).split()) or type(e).__name__}")
                continue
        for text in captions_for(subject, category):
            records.append({"image": rel, "text": text, "split": split, "name": subject, "category": category,
                            "icon": name, "source": PACKAGE})
    records.sort(key=lambda r: (r["image"], r["text"]))
    write_jsonl(out / CAPTIONS, records)
    summary = summarise(records, by=("category",))
    write_readme(
        out, title="Icon caption set (polymodal)",
        about=f"Material Design Icons of things (not interface glyphs), drawn black on white at {size}x{size} "
              "pixels, each with several lower-case captions from its name and category. The test split "
              "holds out whole subjects (about 10%, by a SHA-256 hash of the name) and every subject that "
              "names a held-out emoji or held-out clip art. `name` is the subject, `icon` the icon's name.",
        sources=[{"name": f"{PACKAGE} (npm)", "version": VERSION, "url": URL, "licence": LICENCE,
                  "terms": f"npm integrity {INTEGRITY}"}],
        summary=summary,
        notes=["Variants that add a badge ('-off', '-plus', '-search', ...) and names with digits are left out.",
               "Built with `polymodal.data.icons.build_icons`" + (f" (limit={limit})." if limit is not None else ".")],
    )
    summary.update(written=written, skipped=skipped, version=VERSION,
                   seconds=round(time.perf_counter() - started, 2), out=str(out))
    return summary
