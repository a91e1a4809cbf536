"""Named icons: monochrome glyphs of things ("food-apple", "bicycle", "dragon-head"), drawn black
on white with their names as captions. They widen what the image tower has seen a picture of, in
styles no emoji has. Four icon sets, each its own drawing style:

- `mdi`: Material Design Icons (Apache-2.0), filled glyphs filed in 61 categories (the default);
- `game-icons`: game-icons.net (CC-BY-3.0), 4,134 detailed silhouettes (weapons, creatures,
  tools, food, buildings), not filed in categories;
- `icon-park`: ByteDance's IconPark (Apache-2.0), outline drawings in 39 categories;
- `fa6-solid`: Font Awesome 6 Free, solid (CC-BY-4.0), in 73 categories.

Source: Iconify's npm packages `@iconify-json/<set>` (`icons.json` holds each icon's SVG body by
name, `metadata.json` its categories), pinned by version and integrity hash and rasterised with
cairosvg.

Of a filed set, only the categories of things are kept (animals, food, tools, vehicles, sport,
...), not user interface glyphs (arrows, cursors, text formatting); and of every set, not the
variants that add a badge ("car-off", "car-plus", "car-search") nor names with digits.
"-outline" and "-variant" drawings keep the name of what they draw. The test split holds out whole subjects (by a hash of the name, as the other
builders do), and also every icon whose subject is the name of a held-out emoji or the subject
of held-out clip art (`split_beside`), so a mixture of these sets holds those things out everywhere.
"""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass
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
    held_out_names,
    iconify_svg,
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

SPLIT_SALT = "icons-v1"


@dataclass(frozen=True)
class IconSet:
    package: str
    version: str
    integrity: str
    licence: str
    url: str
    categories: dict[str, str] | None  # the set's categories of things -> the words captions use; None: all


# the categories of things of each filed set, and how captions name them
SETS = {
    "mdi": IconSet(
        "@iconify-json/mdi", "1.2.3",
        "sha512-O3cLwbDOK7NNDf2ihaQOH5F9JglnulNDFV7WprU2dSoZu3h3cWH//h74uQAB87brHmvFVxIOkuBX2sZSzYhScg==",
        "Apache-2.0 (Material Design Icons, (c) Pictogrammers), through Iconify's packaging",
        "https://pictogrammers.com/library/mdi/",
        {"Agriculture": "agriculture", "Animal": "animals", "Automotive": "cars", "Clothing": "clothing",
         "Drawing / Art": "art", "Emoji": "faces", "Food / Drink": "food & drink", "Gaming / RPG": "games",
         "Hardware / Tools": "tools", "Health / Beauty": "health & beauty", "Holiday": "holidays",
         "Home Automation": "home", "Medical / Hospital": "medicine", "Music": "music", "Nature": "nature",
         "People / Family": "people", "Places": "places", "Religion": "religion", "Science": "science",
         "Shopping": "shopping", "Sport": "sport", "Transportation + Flying": "flying",
         "Transportation + Other": "transport", "Transportation + Road": "road transport",
         "Transportation + Water": "boats", "Weather": "weather"}),
    "game-icons": IconSet(
        "@iconify-json/game-icons", "1.2.4",
        "sha512-/HDDZxowXgDJcOEwPspUCq5RuDdl25OyZKdtxqqiPJQNTrWIym7r4StLzIVs77DyNzOWWhH5wDqwYR3WHeDfkg==",
        "CC-BY-3.0 (game-icons.net: Lorc, Delapouite and contributors), through Iconify's packaging",
        "https://game-icons.net/", None),
    "icon-park": IconSet(
        "@iconify-json/icon-park", "1.2.4",
        "sha512-S8fVl49LG/M9hvwb7ruFGInK21AHMv3IJehOJRJgXPLE39OOCP3wbfTWjro/XzsjxRwdvX/lYdGetFOZI0TaJQ==",
        "Apache-2.0 (IconPark, (c) ByteDance), through Iconify's packaging", "https://iconpark.oceanengine.com/",
        {"Animals": "animals", "Baby": "baby things", "Build": "buildings", "Clothes": "clothing",
         "Foods": "food & drink", "Game": "games", "Hardware": "hardware", "Health": "health",
         "Industry": "industry", "Life": "household", "Makeups": "make-up", "Music": "music",
         "Office": "office", "Peoples": "people", "Sports": "sport", "Travel": "travel", "Weather": "weather"}),
    "fa6-solid": IconSet(
        "@iconify-json/fa6-solid", "1.2.4",
        "sha512-LmDNNdJVyvF5mPm1yxWvL8KjCc/E8LzoqnF1LNTVpyY2ZJRUlGOWuPIThdbuFBF2IovgttkIyumhyqfmlHdwKg==",
        "CC-BY-4.0 (Font Awesome Free 6, (c) Fonticons, Inc.), through Iconify's packaging",
        "https://fontawesome.com/", {c: c.lower() for c in (
            "Animals", "Automotive", "Autumn", "Beverage", "Buildings", "Camping", "Childhood", "Clothing",
            "Construction", "Energy", "Food", "Fruits & Vegetables", "Halloween", "Holiday", "Household",
            "Maritime", "Medical", "Music", "Objects", "Science", "Science Fiction", "Sports", "Spring",
            "Summer", "Tabletop Gaming", "Travel", "Vehicles", "Weather", "Winter")}),
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


def captions_for(subject: str, category: str | None) -> list[str]:
    """'food apple' -> 'food apple', 'an icon of a food apple', 'food & drink: food apple', ..."""
    return dedupe([subject, f"an icon of {article(subject)}", *([f"{category}: {subject}"] if category else []),
                   f"a black and white icon of {article(subject)}"])


def split_for(subject: str, held: set[str]) -> str:
    return split_beside(subject, held, salt=SPLIT_SALT)


def _entries(data: dict, filed: dict[str, list[str]], icons: IconSet, held: set[str]) -> dict:
    """{icon name: (subject, category or None, split)} of the icons of things in one set."""
    category_of: dict[str, str] = {}
    for category, names in sorted(filed.items()):
        if icons.categories and category in icons.categories:
            for name in names:
                category_of.setdefault(name, icons.categories[category])
    entries = {}
    for name, icon in data["icons"].items():
        subject = subject_of(name)
        if subject and not icon.get("hidden") and (icons.categories is None or name in category_of):
            entries[name] = (subject, category_of.get(name), split_for(subject, held))
    return entries


def build_icons(out, *, sets: tuple[str, ...] = ("mdi",), cache=None, size: int = 64, progress: bool = False,
                limit: int | None = None) -> dict:
    """Build the icon caption set of `sets` (keys of SETS) in `out`; return counts per split and category.

    `limit`: at most this many icons, spread over the sets, categories and both splits.
    """
    unknown = sorted(set(sets) - set(SETS))
    if unknown or not sets:
        raise ValueError(f"unknown icon set(s) {unknown or sets}: choose from {', '.join(SETS)}")
    try:
        import cairosvg
    except (ImportError, OSError) as e:
        raise SourceError(f"icons are drawn from SVG and need cairosvg and the cairo library: pip install "
                          f"cairosvg; apt-get install libcairo2 ({e})") from None
    started = time.perf_counter()
    out, cache = Path(out), cache_dir(cache)
    held = held_out_names(cache)
    entries, sources = {}, {}
    for key in dict.fromkeys(sets):
        icons = SETS[key]
        folder = fetch_npm(icons.package, icons.version, icons.integrity, cache, (*ICONIFY_FILES, "metadata.json"))
        data = json.loads((folder / "icons.json").read_text(encoding="utf-8"))
        meta = folder / "metadata.json"
        filed = json.loads(meta.read_text(encoding="utf-8")).get("categories", {}) if meta.exists() else {}
        sources[key] = data
        for name, entry in _entries(data, filed, icons, held).items():
            entries[(key, name)] = entry
    order = sorted(entries, key=lambda kn: (unit_hash(f"icon:{kn[1]}" if kn[0] == "mdi" else f"icon:{kn[0]}:{kn[1]}"),
                                            kn))
    chosen = take(order, limit, lambda kn: entries[kn][2] == "test")

    # mdi alone keeps the layout of the first version of this builder (images/<name>.png)
    check_build(out, "icons", {"size": size} if tuple(sets) == ("mdi",) else {"size": size, "sets": sorted(set(sets))})
    records, skipped, written = [], [], 0
    for key, name in track(chosen, f"icons: {len(chosen)} pictures", progress):
        subject, category, split = entries[(key, name)]
        rel = f"images/{name}.png" if key == "mdi" else f"images/{key}/{name}.png"
        if not (out / rel).exists():
            try:
                data = sources[key]
                png = cairosvg.svg2png(bytestring=iconify_svg(data, data["icons"][name]), output_width=size,
                                       output_height=size)
                save_png(on_white(Image.open(io.BytesIO(png))), out / rel)
                written += 1
            except (OSError, ValueError, AttributeError, MemoryError) as e:  # a bad icon: report, go on
                skipped.append(f"{key}/{name}: {' '.join(str(e).split()) or type(e).__name__}")
                continue
        for text in captions_for(subject, category):
            records.append({"image": rel, "text": text, "split": split, "name": subject,
                            "category": category or key, "icon": name, "set": key, "source": SETS[key].package})
    records.sort(key=lambda r: (r["image"], r["text"]))
    write_jsonl(out / CAPTIONS, records)
    summary = summarise(records, by=("category", "set"))
    write_readme(
        out, title="Icon caption set (polymodal)",
        about=f"Icons of things (not interface glyphs) from {', '.join(dict.fromkeys(sets))}, drawn black on white "
              f"at {size}x{size} pixels, each with several lower-case captions from its name and category. The test "
              "split holds out whole subjects (about 10%, by a SHA-256 hash of the name) and every subject that "
              "names a held-out emoji or held-out clip art. `name` is the subject, `icon` the icon's name, `set` "
              "its icon set.",
        sources=[{"name": f"{SETS[k].package} (npm)", "version": SETS[k].version, "url": SETS[k].url,
                  "licence": SETS[k].licence, "terms": f"npm integrity {SETS[k].integrity}"}
                 for k in dict.fromkeys(sets)],
        summary=summary,
        notes=["Variants that add a badge ('-off', '-plus', '-search', ...) and names with digits are left out.",
               "Built with `polymodal.data.icons.build_icons`" + (f" (limit={limit})." if limit is not None else ".")],
    )
    summary.update(written=written, skipped=skipped, versions={k: SETS[k].version for k in dict.fromkeys(sets)},
                   seconds=round(time.perf_counter() - started, 2), out=str(out))
    return summary
