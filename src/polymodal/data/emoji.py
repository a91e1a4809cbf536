"""Emoji in several drawing styles, with captions from their names, short names, tags and
categories, and a test split that holds out whole emoji across every style.

Sources (npm packages, fetched with `npm pack` into the cache and pinned by version and
integrity hash):

- emoji-datasource-{google,twitter,apple} (iamcal/emoji-data): `emoji.json` and
  `img/<style>/64/<file>.png`. Google (Noto) images are Apache-2.0, Twitter (Twemoji) images
  CC-BY-4.0; Apple's are (c) Apple and not licensed for commercial use, so "apple" is for
  evaluation only: all its pictures go to the test split (they are not in the default styles).
- openmoji: `data/openmoji.json` and `color/svg/<HEXCODE>.svg`, CC-BY-SA-4.0, rasterised
  with cairosvg.
- Iconify's packaged emoji sets (`@iconify-json/*`: `icons.json`, SVG bodies by name),
  rasterised with cairosvg: "fluent" (Microsoft Fluent Emoji, flat), "fluentcolor" (its shaded
  colour style) and "fluentmono" (its black line style), all MIT; "emojione" (EmojiOne 2) and
  "emojionemono" (its one-colour style), CC-BY-4.0, and "emojionev1" (EmojiOne 1, CC-BY-SA-4.0);
  "notov1" (the first Noto "blob" emoji) and "fxemoji" (Firefox OS), both Apache-2.0;
  "streamline" (Streamline Emojis, CC-BY-4.0). Fluent's `chars.json` gives each
  name its code points; the other sets use the same CLDR names, or them with the hyphens
  dropped ("admissiontickets") or a variant number added ("baby-2"), and are keyed through
  Fluent's map (a name it lacks is left out). Their captions are the emoji-datasource record's
  for the same code points, so every style of an emoji carries the same words.

Pictures are composited onto white at build time (RGB PNG), so every reader sees the same
pixels. Skin-tone variants and the "component" category (bare skin-tone and hair swatches)
are skipped: a variant would repeat its base emoji's captions. The split key is the emoji's
code-point sequence without variation selectors (U+FE0F), so "2764-FE0F" in one package and
"2764" in another are the same emoji and fall on the same side.
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

ICONIFY = ("fluent", "fluentcolor", "fluentmono", "emojione", "emojionev1", "emojionemono", "notov1", "fxemoji",
           "streamline")
STYLES = ("google", "twitter", "openmoji", "apple", *ICONIFY)
EVAL_ONLY = ("apple",)

# style -> (npm package, pinned version, npm integrity of its tarball)
PACKAGES = {
    "google": ("emoji-datasource-google", "16.0.0",
               "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A=="),
    "twitter": ("emoji-datasource-twitter", "16.0.0",
                "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ=="),
    "apple": ("emoji-datasource-apple", "16.0.0",
              "sha512-dVYjsK0FnCry9F+PBtnivhG2K0xdwlmqYaSgiUtztUdAGPYiHYhZcVKvNBqC791g2qyEcFNTBO6utg4eQ3uLTw=="),
    "openmoji": ("openmoji", "17.0.0",
                 "sha512-EBnYrNGdcdw+OSXmENeNE1yBNRu6tOraTmoOyUbJkTmvT/+XETp8RZLSJFzD3lrPc5N9CzsyPnRTk0Vp4UaI9w=="),
    "fluent": ("@iconify-json/fluent-emoji-flat", "1.2.6",
               "sha512-RY47RgPb47fYUiyrA64sIOL0+UU02s29sXpNBbIQRBUlPlfNFTKUmZDERGuxDs/7yNGWqQYvuaSYM1M4fRXlUw=="),
    "emojione": ("@iconify-json/emojione", "1.2.3",
                 "sha512-T9+T3HIbJNLKKsmxYKlaYhvnHYkz/HNYTV7SHCXVZPfeUi4FqskY70YeN8yYAZT8cCv7w5vJxS4Q1m8zb9CMMg=="),
    "notov1": ("@iconify-json/noto-v1", "1.2.5",
               "sha512-/DsVMius69Q0fRS53z7QK1TROSuar606jiIx+laXtdsYGMXpf6LtHBx6CGfoo3UHHb/XpBsw+1L1x3eyPqMuVA=="),
    "fluentcolor": ("@iconify-json/fluent-emoji", "1.2.7",
                    "sha512-D8G6bKAyIsyxP1rzZtIWr/gg/fO4Rg1+DyCWlfqKK4h8W+4Em/Y0P6QYgJUQTlUcagzJvSyg+9OBv4hz4Hc/QA=="),
    "emojionev1": ("@iconify-json/emojione-v1", "1.2.3",
                   "sha512-UjI2VQEXVtGlPBvQuxEizro7QCgBcJDOYwKUupquvvZ8UV4xOlvm45IU82JYWegiAWLerY79gFLMZ26U6Ms+ww=="),
    "fxemoji": ("@iconify-json/fxemoji", "1.2.2",
                "sha512-UAasRaxzFUKfIGSmLwnoarsssA4LX0VLLuEmplIqM6ZNQqIQRtav8tZ4H1neTlBreXuMQyAifr5jP4kn78DpiQ=="),
    "fluentmono": ("@iconify-json/fluent-emoji-high-contrast", "1.2.6",
                   "sha512-esqhZPpkrF7sNX3NsLoh8KW64okEr/bzko7WNnFP+qTJGAqDPDYjp0925yxuivXy3HtVQB8xhIKu3+Nq1byX5w=="),
    "emojionemono": ("@iconify-json/emojione-monotone", "1.2.1",
                     "sha512-cZSNcPsuiAD6HCzCh/2dYKGh3pNI0jJlxBxQWfC33cQsPtqYZqulGBvlkThXYNvDl8VxgVHT9u+izyX/yeEIkA=="),
    "streamline": ("@iconify-json/streamline-emojis", "1.2.4",
                   "sha512-iNr9T9XuZVTyQPJO8ZlLxBzPkpi7qMl+z1l0C31vpEMqhPMelth3n7CeWQYtixdetDPdI81yeG4ROqjWpYJE6A=="),
}

LICENCES = {
    "google": ("Apache-2.0 (Noto Emoji images); emoji.json MIT (iamcal/emoji-data)",
               "https://github.com/googlefonts/noto-emoji"),
    "twitter": ("CC-BY-4.0 (Twemoji graphics, (c) Twitter, Inc and other contributors); emoji.json MIT",
                "https://github.com/jdecked/twemoji"),
    "apple": ("(c) Apple Inc., NOT licensed for commercial use or redistribution; evaluation only; "
              "emoji.json MIT", "https://github.com/iamcal/emoji-data"),
    "openmoji": ("CC-BY-SA-4.0 (OpenMoji, HfG Schwaebisch Gmuend; the pictures and data/openmoji.json, "
                 "whose tags feed this style's captions); attribution required, derivatives share alike",
                 "https://openmoji.org"),
    "fluent": ("MIT (Fluent Emoji, (c) Microsoft Corporation), through Iconify's packaging",
               "https://github.com/microsoft/fluentui-emoji"),
    "emojione": ("CC-BY-4.0 (EmojiOne 2, (c) Ranks.com / JoyPixels), through Iconify's packaging; attribution "
                 "required", "https://github.com/joypixels/emojione-legacy"),
    "notov1": ("Apache-2.0 (Noto Emoji, the first 'blob' version, (c) Google), through Iconify's packaging",
               "https://github.com/googlefonts/noto-emoji"),
    "fluentcolor": ("MIT (Fluent Emoji, colour style, (c) Microsoft Corporation), through Iconify's packaging",
                    "https://github.com/microsoft/fluentui-emoji"),
    "emojionev1": ("CC-BY-SA-4.0 (EmojiOne 1, (c) Ranks.com / JoyPixels), through Iconify's packaging; "
                   "attribution required, derivatives share alike", "https://github.com/joypixels/emojione-legacy"),
    "fxemoji": ("Apache-2.0 (FxEmoji, (c) Mozilla Foundation), through Iconify's packaging",
                "https://github.com/mozilla/fxemoji"),
    "fluentmono": ("MIT (Fluent Emoji, high-contrast line style, (c) Microsoft Corporation), through Iconify's "
                   "packaging", "https://github.com/microsoft/fluentui-emoji"),
    "emojionemono": ("CC-BY-4.0 (EmojiOne 2, monotone, (c) Ranks.com / JoyPixels), through Iconify's packaging; "
                     "attribution required", "https://github.com/joypixels/emojione-legacy"),
    "streamline": ("CC-BY-4.0 (Streamline Emojis, (c) Streamline / webalys), through Iconify's packaging; "
                   "attribution required", "https://www.streamlinehq.com/emojis"),
}

# The nine Unicode emoji groups, as openmoji spells them, in words for captions; "extras"
# holds openmoji's own pictograms that fit none of them.
CATEGORY_WORDS = {
    "smileys-emotion": "smileys & emotion",
    "people-body": "people & body",
    "animals-nature": "animals & nature",
    "food-drink": "food & drink",
    "travel-places": "travel & places",
    "activities": "activities",
    "objects": "objects",
    "symbols": "symbols",
    "flags": "flags",
    "extras": "pictograms",
}
SPLIT_SALT = "emoji-v1"


def emoji_key(codepoints: str) -> str:
    """'2764-FE0F' and '2764' -> '2764': the code points without variation selectors."""
    return "-".join(cp for cp in codepoints.upper().replace("_", "-").split("-") if cp and cp != "FE0F")


def emoji_split(key: str) -> str:
    """The fixed split of an emoji (by `emoji_key`), the same in every style."""
    return split_of(key, salt=SPLIT_SALT)


def _category(name: str) -> str:
    """'Smileys & Emotion' -> 'smileys-emotion'."""
    return "-".join(name.lower().replace("&", " ").split())


# --- fetching ----------------------------------------------------------------------------


def fetch_package(style: str, cache: Path) -> Path:
    """The unpacked package of `style` in the cache (fetched with `npm pack` the first time)."""
    package, version, integrity = PACKAGES[style]
    if style == "openmoji":
        wanted = ("data/openmoji.json", "LICENSE.txt", "package.json", "color/svg/")
    elif style in ICONIFY:
        wanted = ICONIFY_FILES
    else:
        wanted = ("emoji.json", "LICENSE", "package.json", f"img/{style}/64/")
    return fetch_npm(package, version, integrity, cache, wanted)


# --- entries and captions ----------------------------------------------------------------


def _flag_phrase(name: str) -> str | None:
    """'flag: france' or 'france flag' -> 'the flag of france'."""
    if name.startswith("flag: "):
        return "the flag of " + name[6:]
    if name.endswith(" flag") and name != "flag":
        return "the flag of " + name[:-5]
    return None


def captions_for(name: str, category: str, subcategory: str, keywords: list[str]) -> list[str]:
    """'grinning face', 'an emoji of a grinning face', 'smileys & emotion: grinning face',
    'face smiling: grinning face', 'cheerful, face, grin, smile' (tags or short names)."""
    flag = _flag_phrase(name)
    subject = flag[len("the flag of "):] if flag else name  # "a flag: france", not "a flag: france flag"
    words = [k for k in dedupe(keywords) if k != name and len(k) > 2][:8]  # no country codes
    return dedupe([
        name,
        f"an emoji of {flag or article(name)}",
        f"{CATEGORY_WORDS.get(category, 'emoji')}: {subject}",
        f"{subcategory.replace('-', ' ')}: {subject}",
        ", ".join(words),
    ])


def _datasource_entries(folder: Path, style: str | None) -> list[dict]:
    """emoji-datasource's records with `style`'s pictures; every record (no picture) for None."""
    entries = []
    for e in json.loads((folder / "emoji.json").read_text(encoding="utf-8")):
        category = _category(e["category"])
        if category == "component" or (style and not e.get(f"has_img_{style}")):
            continue
        name = " ".join(e["name"].lower().split())
        # short names, less country codes ("fr", "flag-fr") that say nothing in words
        short = [re.sub(r"\d+$", "", s).replace("_", " ").replace("-", " ")  # "mouse2" -> "mouse"
                 for s in e.get("short_names", []) if len(s) > 2 and not s.startswith("flag-")]
        entries.append({
            "key": emoji_key(e["unified"]), "name": name, "category": category,
            "subcategory": e["subcategory"], "keywords": short,
            "file": folder / "img" / style / "64" / e["image"] if style else None,
        })
    return entries


SKIN_TONES = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}


def _iconify_entries(folder: Path, records: dict[str, dict], keys_by_name: dict[str, str]) -> list[dict]:
    """An Iconify emoji set's pictures, keyed by code points through `keys_by_name` and worded by
    the emoji-datasource `records` of the same key (a picture with neither is left out)."""
    data = json.loads((folder / "icons.json").read_text(encoding="utf-8"))
    entries = []
    for name, icon in data["icons"].items():
        key = (keys_by_name.get(name) or keys_by_name.get(re.sub(r"-\d+$", "", name))
               or keys_by_name.get(f"~{name}"))
        if key is None or key not in records or SKIN_TONES & set(key.split("-")):
            continue
        entries.append({**records[key], "file": folder / f"icons.json:{name}", "svg": iconify_svg(data, icon)})
    return entries


def emoji_records(cache: Path) -> dict[str, dict]:
    """Every emoji's emoji-datasource record (name, category, subcategory, keywords) by its key:
    the words of all styles drawn from Iconify, and the held-out names the icons builder avoids."""
    return {e["key"]: e for e in reversed(_datasource_entries(fetch_package("google", cache), None))}


def _fluent_keys(folder: Path) -> dict[str, str]:
    """Fluent's CLDR-style names ('grinning-face') -> emoji keys, from its chars.json; '~' + a name
    without its hyphens ('~grinningface') finds the same key for sets that squash names."""
    chars = json.loads((folder / "chars.json").read_text(encoding="utf-8"))
    keys = {name: emoji_key(codepoints) for codepoints, name in sorted(chars.items())}
    keys.update({f"~{name.replace('-', '')}": key for name, key in keys.items()})  # "admissiontickets"
    return keys


def _openmoji_entries(folder: Path) -> list[dict]:
    entries = []
    for e in json.loads((folder / "data" / "openmoji.json").read_text(encoding="utf-8")):
        if e.get("skintone") or e["group"] == "component":
            continue
        category, subcategory = e["group"], e["subgroups"]
        if category.startswith("extras"):  # openmoji's own pictograms, filed under a subgroup
            category = subcategory if subcategory in CATEGORY_WORDS else "extras"
        name = " ".join(e["annotation"].lower().split())
        if e["group"] == "extras-openmoji":
            name = name.replace("-", " ")
        tags = [t.strip() for t in f"{e['tags']},{e['openmoji_tags']}".split(",")]
        entries.append({
            "key": emoji_key(e["hexcode"]), "name": name, "category": category,
            "subcategory": subcategory, "keywords": tags,
            "file": folder / "color" / "svg" / f"{e['hexcode']}.svg",
        })
    return entries


def _render(entry: dict, size: int) -> Image.Image:
    path = entry["file"]
    if path.suffix == ".svg" or "svg" in entry:
        try:
            import cairosvg
        except (ImportError, OSError) as e:
            raise SourceError("styles drawn in SVG (openmoji, fluent, emojione, notov1) need cairosvg and "
                              f"the cairo library: pip install cairosvg; apt-get install libcairo2 ({e})") from None
        svg = entry["svg"] if "svg" in entry else path.read_bytes()
        try:
            png = cairosvg.svg2png(bytestring=svg, output_width=size, output_height=size)
        except AttributeError:  # cairosvg trips on a marker that points nowhere (1 openmoji file)
            svg = re.sub(rb'\smarker-(?:start|mid|end)="url\(#[^"]*\)"', b"", svg)
            png = cairosvg.svg2png(bytestring=svg, output_width=size, output_height=size)
        return on_white(Image.open(io.BytesIO(png)))
    image = on_white(Image.open(path))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return image


# --- the builder -------------------------------------------------------------------------


def build_emoji(out, *, styles=("google", "twitter", "openmoji"), cache=None, size: int = 64,
                progress: bool = False, limit: int | None = None) -> dict:
    """Build the emoji caption set in `out`; return counts per split, category and style.

    `styles`: any of "google", "twitter", "openmoji", "apple" (apple: test split only).
    `size`: side in pixels. emoji-datasource ships 64-pixel PNGs only, so other sizes resample
    them (LANCZOS); openmoji is rendered from SVG at the size asked for.
    `limit`: at most this many emoji, the same ones in every style that has them (a fixed,
    hashed choice, so a small set still spans the categories and holds both splits).
    """
    started = time.perf_counter()
    styles = tuple(dict.fromkeys(styles))
    unknown = [s for s in styles if s not in STYLES]
    if unknown or not styles:
        raise ValueError(f"unknown emoji style(s) {unknown}; known: {', '.join(STYLES)}")
    out, cache = Path(out), cache_dir(cache)
    per_style = {}
    if set(styles) & set(ICONIFY):  # their words come from emoji-datasource, their keys through Fluent's names
        records = emoji_records(cache)
        keys_by_name = _fluent_keys(fetch_package("fluent", cache))
    for style in styles:
        folder = fetch_package(style, cache)
        if style in ICONIFY:
            entries = _iconify_entries(folder, records, keys_by_name)
        elif style == "openmoji":
            entries = _openmoji_entries(folder)
        else:
            entries = _datasource_entries(folder, style)
        unique = {}
        for entry in entries:
            unique.setdefault(entry["key"], entry)  # the first of a key that repeats in one package
        per_style[style] = unique
    # a fixed order (by hash, so the first few span the categories); `limit` keeps both splits
    keys = sorted(set().union(*per_style.values()), key=lambda k: (unit_hash(f"pick:{k}"), k))
    chosen = set(take(keys, limit, lambda k: emoji_split(k) == "test"))

    check_build(out, "emoji", {"size": size})
    records, jobs = [], []
    for style, unique in per_style.items():
        for key in sorted(unique, key=lambda k: (unit_hash(f"pick:{k}"), k)):
            if key not in chosen:
                continue
            entry = unique[key]
            rel = f"images/{style}/{key.lower()}.png"
            if not (out / rel).exists():
                jobs.append((entry, out / rel))
            heldout = emoji_split(key) == "test"
            for text in captions_for(entry["name"], entry["category"], entry["subcategory"], entry["keywords"]):
                records.append({
                    "image": rel, "text": text,
                    "split": "test" if heldout or style in EVAL_ONLY else "train",
                    "name": entry["name"], "category": entry["category"],
                    "subcategory": entry["subcategory"], "style": style, "emoji": key,
                    "heldout": heldout, "source": PACKAGES[style][0],
                })
    skipped = []
    for entry, path in track(jobs, f"emoji: drawing {len(jobs)} pictures", progress):
        try:
            save_png(_render(entry, size), path)
        except (OSError, ValueError, AttributeError, SyntaxError, MemoryError) as e:  # a bad file: report, go on
            skipped.append(f"{entry['file']}: {' '.join(str(e).split()) or type(e).__name__}")
    if skipped:
        gone = {p.relative_to(out).as_posix() for _, p in jobs if not p.exists()}
        records = [r for r in records if r["image"] not in gone]

    records.sort(key=lambda r: (r["image"], r["text"]))
    write_jsonl(out / CAPTIONS, records)
    summary = summarise(records, by=("category", "style"))
    sources = []
    for style in styles:
        package, version, integrity = PACKAGES[style]
        licence, url = LICENCES[style]
        terms = "Evaluation only: every picture of this style is in the test split." if style in EVAL_ONLY else ""
        sources.append({"name": f"{package} (npm)", "version": version, "url": url, "licence": licence,
                        "terms": f"{terms} npm integrity {integrity}".strip()})
    write_readme(
        out, title="Emoji caption set (polymodal)",
        about=f"Emoji drawn in the styles {', '.join(styles)} at {size}x{size} pixels, composited on "
              "white, each with several lower-case captions from its name, short names or tags and its "
              "category. The test split holds out whole emoji (about 10%, by a SHA-256 hash of the "
              "code points without U+FE0F), so a test emoji is unseen in every style. `heldout` marks "
              "those emoji; `style`, `emoji`, `category`, `subcategory` and `name` describe each line.",
        sources=sources, summary=summary,
        notes=["Skin-tone variants and the component category are left out.",
               "Built with `polymodal.data.emoji.build_emoji`"
               + (f" (limit={limit})." if limit is not None else ".")],
    )
    summary.update(written=len(jobs) - len(skipped), skipped=skipped, versions={s: PACKAGES[s][1] for s in styles},
                   seconds=round(time.perf_counter() - started, 2), out=str(out))
    return summary
