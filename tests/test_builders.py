"""The data-set builders: scenes and clips fully (drawn locally), emoji and clip art on small
subsets of the real packages (fetched from npm and Debian into the default cache once; a test
is skipped, with the reason, only when the registry cannot be reached), and the contact sheet."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from polymodal.data.common import CAPTIONS, CLIPS, SourceUnavailable, article, read_jsonl
from polymodal.data.scenes import COLOURS, MARGIN, NUMBERS, build_clips, build_scenes
from polymodal.data.sheet import contact_sheet
from polymodal.processing.image import load_image


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _by_image(records: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for r in records:
        groups[r["image"]].append(r)
    return groups


def _check_captions(records: list[dict]) -> None:
    for r in records:
        assert r["text"].strip(), r
        assert r["text"] == r["text"].lower() == " ".join(r["text"].split()), r["text"]
        assert r["split"] in ("train", "test")


def _rerun_is_noop(build, out: Path, **kwargs) -> None:
    before = _files(out)
    summary = build(out, **kwargs)
    assert summary["written"] == 0
    assert _files(out) == before  # captions.jsonl and README.md are rewritten to the same bytes


def _relation(a: dict, b: dict) -> str | None:
    if a["x"] + MARGIN < b["x"]:
        return "left of"
    if a["x"] - MARGIN > b["x"]:
        return "right of"
    if a["y"] + MARGIN < b["y"]:
        return "above"
    if a["y"] - MARGIN > b["y"]:
        return "below"
    return None


def _find(objects: list[dict], name: str) -> dict:
    """The one object 'circle' or 'red circle' names."""
    *colour, shape = name.split()
    found = [o for o in objects if o["shape"] == shape and (not colour or o["colour"] == colour[0])]
    assert len(found) == 1, (name, objects)
    return found[0]


def _answer(q: str, objects: list[dict]) -> str:
    """Work out the answer to a scene question from the objects alone."""
    if q == "how many shapes are there?":
        return NUMBERS[len(objects)]
    if m := re.fullmatch(r"how many (\w+)s are there\?", q):
        return NUMBERS[sum(o["shape"] == m[1] for o in objects)]
    if m := re.fullmatch(r"what colour is the (\w+)\?", q):
        return _find(objects, m[1])["colour"]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", q):
        (obj,) = [o for o in objects if o["colour"] == m[1]]
        return obj["shape"]
    if m := re.fullmatch(r"is the ([\w ]+?) (left of|right of|above|below) the ([\w ]+)\?", q):
        a, b = _find(objects, m[1]), _find(objects, m[3])
        truth = _relation(a, b)
        assert truth is not None, q  # only clear relations are asked
        if m[2] == truth:
            return "yes"
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        assert m[2] == opposite[truth], q
        return "no"
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", q):
        return "yes" if any(o["colour"] == m[1] and o["shape"] == m[2] for o in objects) else "no"
    raise AssertionError(f"unknown question {q!r}")


# --- scenes and clips ---------------------------------------------------------------------------


def test_scenes_are_deterministic_resumable_and_true(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    summary = build_scenes(a, n=40, seed=3, size=96)
    build_scenes(b, n=40, seed=3, size=96)
    assert _files(a) == _files(b)  # same bytes, pictures, captions and README alike
    assert summary["images"] == 40 and summary["written"] == 40
    assert set(summary["splits"]) == {"train", "test"}
    assert (a / "README.md").read_text().count("Apache-2.0") >= 1
    _rerun_is_noop(build_scenes, a, n=40, seed=3, size=96)
    with pytest.raises(ValueError, match="another folder"):
        build_scenes(a, n=40, seed=3, size=64)  # other pixels: refuse to mix them in

    records = read_jsonl(a / CAPTIONS)
    _check_captions(records)
    kinds = defaultdict(int)
    for image, lines in _by_image(records).items():
        r = lines[0]
        objects = r["objects"]
        assert all(line["objects"] == objects and line["qa"] == r["qa"] for line in lines)
        assert r["count"] == len(objects) >= 1
        assert (r["shape"], r["colour"], r["size"]) == (objects[0]["shape"], objects[0]["colour"], "large")
        assert len({line["text"] for line in lines}) == len(lines) >= 3
        for line in lines:  # a caption names only colours and shapes that are drawn
            words = set(line["text"].replace(",", " ").split())
            assert words & set(COLOURS) <= {o["colour"] for o in objects}, line["text"]
            assert {w.rstrip("s") for w in words} & {"circle", "square", "triangle", "star"} <= {
                o["shape"] for o in objects}, line["text"]
        assert f"{NUMBERS[len(objects)]} shape" in " ".join(line["text"] for line in lines)
        for qa in r["qa"]:
            assert qa["a"] == _answer(qa["q"], objects), (qa, objects)
            kinds[qa["type"]] += 1
        picture = np.asarray(load_image(a / image), np.int32)
        assert picture.shape == (96, 96, 3)
        for o in objects:  # the centre pixel of each shape has its colour
            y, x = min(95, int(o["y"] * 96)), min(95, int(o["x"] * 96))
            assert np.abs(picture[y, x] - COLOURS[o["colour"]]).max() <= 12, (image, o)
    assert set(kinds) == {"count", "colour", "shape", "position", "yes/no"}


def test_scene_captions_read_naturally(tmp_path):
    build_scenes(tmp_path, n=60, seed=0, size=64)
    texts = {r["text"] for r in read_jsonl(tmp_path / CAPTIONS)}
    assert any(re.fullmatch(r"a large \w+ \w+", t) for t in texts)  # "a large green triangle"
    assert any(re.fullmatch(r"(two|three|four) (small |large )?\w+ \w+s( and .+)?", t) for t in texts)
    assert any(re.search(r" (left of|right of|above|below) ", t) for t in texts)
    assert not any(" a orange" in t or " an " + c in t for t in texts for c in ("red", "blue"))


def test_clips(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    summary = build_clips(a, n=6, frames=5, seed=1, size=48)
    build_clips(b, n=6, frames=5, seed=1, size=48)
    assert _files(a) == _files(b)
    assert summary["images"] == 6 and summary["written"] == 30
    records = read_jsonl(a / CLIPS)
    _check_captions(records)
    for r in records:
        assert len(r["frames"]) == 5 and r["motion"] in r["text"] and r["shape"] in r["text"]
        frames = [np.asarray(load_image(a / f), np.int32) for f in r["frames"]]
        assert all(f.shape == (48, 48, 3) for f in frames)
        assert any(np.abs(f - frames[0]).max() > 0 for f in frames[1:])  # something moves
    _rerun_is_noop(build_clips, a, n=6, frames=5, seed=1, size=48)


def test_contact_sheet(tmp_path):
    build_scenes(tmp_path / "s", n=10, seed=0, size=64)
    sheet = contact_sheet(tmp_path / "s", n=8, seed=0)
    assert sheet.mode == "RGB" and 400 <= sheet.width <= 2000 and 300 <= sheet.height <= 2000
    assert np.asarray(sheet).std() > 10  # pictures and text, not a blank page
    assert contact_sheet(tmp_path / "s", n=8, seed=0).tobytes() == sheet.tobytes()
    build_clips(tmp_path / "c", n=3, frames=4, size=32)
    assert contact_sheet(tmp_path / "c", n=3).width >= 176
    with pytest.raises(ValueError, match="no pictures"):
        contact_sheet(tmp_path / "s", split="validation")


def test_article():
    words = ("eagle", "pumpkin", "user", "buttons", "glass", "face with rolling eyes", "the flag of chad")
    assert [article(w) for w in words] == [
        "an eagle", "a pumpkin", "a user", "buttons", "a glass", "a face with rolling eyes", "the flag of chad"]


# --- emoji ----------------------------------------------------------------------------------------


def _fetching(build, *args, **kwargs) -> dict:
    try:
        return build(*args, **kwargs)
    except SourceUnavailable as e:
        pytest.skip(f"source unavailable (no network or no npm / apt): {e}")


def test_emoji_captions_and_keys():
    from polymodal.data.emoji import captions_for, emoji_key, emoji_split

    texts = captions_for("grinning face", "smileys-emotion", "face-smiling", ["smile", "Happy", "grin", "smile"])
    assert texts == ["grinning face", "an emoji of a grinning face", "smileys & emotion: grinning face",
                     "face smiling: grinning face", "smile, happy, grin"]
    assert "an emoji of the flag of france" in captions_for("flag: france", "flags", "country-flag", [])
    assert emoji_key("2764-FE0F") == emoji_key("2764") == "2764"
    assert emoji_split(emoji_key("1f600")) == emoji_split("1F600")


def test_emoji_subset(tmp_path):
    from polymodal.data.emoji import build_emoji

    out = tmp_path / "emoji"
    styles = ("google", "twitter", "openmoji", "apple")
    summary = _fetching(build_emoji, out, styles=styles, limit=40)
    assert set(summary["style"]) == set(styles) and summary["images"] > 100
    records = read_jsonl(out / CAPTIONS)
    _check_captions(records)
    split_of_emoji: dict[str, set[str]] = defaultdict(set)
    styles_of_emoji: dict[str, set[str]] = defaultdict(set)
    for image, lines in _by_image(records).items():
        r = lines[0]
        assert len(lines) >= 3 and all(line["emoji"] == r["emoji"] for line in lines)
        assert image == f"images/{r['style']}/{r['emoji'].lower()}.png"
        if r["style"] == "apple":
            assert r["split"] == "test"  # evaluation only
        else:
            split_of_emoji[r["emoji"]].add(r["split"])
        assert r["heldout"] == (r["split"] == "test" and r["style"] != "apple") or r["style"] == "apple"
        styles_of_emoji[r["emoji"]].add(r["style"])
        assert load_image(out / image).size == (64, 64)
    assert all(len(s) == 1 for s in split_of_emoji.values())  # a held-out emoji is held out in every style
    held = {k for k, s in split_of_emoji.items() if s == {"test"}}
    assert held and len(held) < len(split_of_emoji)
    assert sum(len(s) >= 3 for s in styles_of_emoji.values()) >= 20  # the same emoji across styles
    readme = (out / "README.md").read_text()
    for licence in ("Apache-2.0", "CC-BY-4.0", "CC-BY-SA-4.0", "not licensed for commercial use", "16.0.0"):
        assert licence.lower() in readme.lower()
    _rerun_is_noop(build_emoji, out, styles=styles, limit=40)


def test_emoji_iconify_styles_share_keys_splits_and_words(tmp_path):
    from polymodal.data.emoji import build_emoji

    out = tmp_path / "emoji"
    styles = ("google", "fluent", "fluentmono", "emojione", "emojionemono", "notov1", "fxemoji",
              "streamline")  # names as given, squashed (fxemoji), numbered (streamline)
    summary = _fetching(build_emoji, out, styles=styles, limit=60)
    assert set(summary["style"]) == set(styles) and not summary["skipped"]
    records = read_jsonl(out / CAPTIONS)
    _check_captions(records)
    words: dict[tuple[str, str], list[str]] = {}
    split_of_emoji: dict[str, set[str]] = defaultdict(set)
    spread = []
    for image, lines in _by_image(records).items():
        r = lines[0]
        words[r["style"], r["emoji"]] = sorted(line["text"] for line in lines)
        split_of_emoji[r["emoji"]].add(r["split"])
        picture = np.asarray(load_image(out / image), dtype=np.float32)
        assert picture.shape == (64, 64, 3) and picture.std() > 1, image  # drawn, not a blank square
        spread.append(picture.std())
    assert np.median(spread) > 30  # (a few emoji are nearly white: "white large square", "fog")
    assert all(len(s) == 1 for s in split_of_emoji.values())  # held out in every style alike
    shared = [(s, k) for s, k in words if s != "google" and ("google", k) in words]
    assert len(shared) >= 60  # the Iconify sets find most emoji by their names
    for style, key in shared:  # and word them as emoji-datasource does
        assert words[style, key] == words["google", key], (style, key)
    readme = (out / "README.md").read_text()
    for licence in ("MIT", "CC-BY-4.0", "Apache-2.0", "1.2.6", "1.2.3", "1.2.5"):
        assert licence.lower() in readme.lower()
    _rerun_is_noop(build_emoji, out, styles=styles, limit=60)


# --- icons ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, subject", [
    ("food-apple-outline", "food apple"), ("bicycle", "bicycle"), ("car-off", None), ("car-search", None),
    ("rabbit-variant", "rabbit"), ("numeric-1", None), ("abstract-001", None), ("dragon-head", "dragon head"),
])
def test_icon_subjects(name, subject):
    from polymodal.data.icons import subject_of

    assert subject_of(name) == subject


def test_icons_subset_holds_out_what_emoji_and_clipart_hold_out(tmp_path):
    from polymodal.data.clipart import SPLIT_SALT
    from polymodal.data.common import cache_dir, held_out_names, split_of
    from polymodal.data.icons import build_icons, split_for

    out = tmp_path / "icons"
    summary = _fetching(build_icons, out, limit=80)
    assert summary["images"] == 80 and not summary["skipped"] and len(summary["category"]) >= 10
    records = read_jsonl(out / CAPTIONS)
    _check_captions(records)
    held = held_out_names(cache_dir(None))
    assert len(held) > 100 and all(split_for(name, held) == "test" for name in sorted(held)[:50])
    for image, lines in _by_image(records).items():
        r = lines[0]
        assert {line["split"] for line in lines} == {r["split"]} and len(lines) >= 3
        if r["name"] in held or split_of(r["name"], salt=SPLIT_SALT) == "test":
            assert r["split"] == "test", r["name"]
        picture = np.asarray(load_image(out / image), dtype=np.float32)
        assert picture.shape == (64, 64, 3) and picture.min() < 60 < 200 < picture.max()  # black on white
    assert {"train", "test"} == {r["split"] for r in records}
    assert "apache-2.0" in (out / "README.md").read_text().lower()
    _rerun_is_noop(build_icons, out, limit=80)


def test_icon_sets_each_in_its_folder_with_its_licence(tmp_path):
    from polymodal.data.common import cache_dir, held_out_names
    from polymodal.data.icons import SETS, build_icons, split_for

    with pytest.raises(ValueError, match="unknown icon set"):
        build_icons(tmp_path / "bad", sets=("mdi", "clippy"))
    sets = ("game-icons", "icon-park", "fa6-solid")
    out = tmp_path / "icons"
    summary = _fetching(build_icons, out, sets=sets, limit=90)
    assert summary["images"] == 90 and not summary["skipped"] and set(summary["set"]) == set(sets)
    records = read_jsonl(out / CAPTIONS)
    _check_captions(records)
    held = held_out_names(cache_dir(None))
    for image, lines in _by_image(records).items():
        r = lines[0]
        assert image == f"images/{r['set']}/{r['icon']}.png" and r["source"] == SETS[r["set"]].package
        assert r["split"] == split_for(r["name"], held) and not any(c.isdigit() for c in r["name"])
        if SETS[r["set"]].categories is None:  # game-icons are not filed: no category caption
            assert not any(":" in line["text"] for line in lines)
    readme = (out / "README.md").read_text().lower()
    assert all(licence in readme for licence in ("cc-by-3.0", "apache-2.0", "cc-by-4.0"))
    with pytest.raises(ValueError, match="holds a build made with"):  # another choice of sets, same folder
        build_icons(out, sets=("game-icons",), limit=10)
    _rerun_is_noop(build_icons, out, sets=sets, limit=90)


# --- Tux Paint stamps ----------------------------------------------------------------------------


@pytest.mark.parametrize("stem, folder, subject", [
    ("lion-2", "cats", "lion"), ("tiger_sumatran", "cats", "tiger sumatran"), ("100sacagawea", "coins", "sacagawea"),
    ("050", "coins", "coins"),
])
def test_stamp_subjects(stem, folder, subject):
    from polymodal.data.stamps import subject_of

    assert subject_of(stem, folder) == subject


def test_stamp_descriptions_keep_their_first_sentence():
    from polymodal.data.stamps import first_sentence

    assert first_sentence("A white kitten.") == "a white kitten"
    assert first_sentence("A Canadian dollar ($1.00) called a loonie. It\u2019s named after the bird.") == \
        "a canadian dollar ($1.00) called a loonie"


def test_stamps_subset_photos_and_drawings_on_white(tmp_path):
    from polymodal.data.common import cache_dir, held_out_names, split_beside
    from polymodal.data.stamps import SPLIT_SALT, build_stamps

    out = tmp_path / "stamps"
    summary = _fetching(build_stamps, out, limit=40, size=96)
    assert summary["images"] + len(summary["skipped"]) == 40 and len(summary["skipped"]) <= 2
    records = read_jsonl(out / CAPTIONS)
    _check_captions(records)
    held = held_out_names(cache_dir(None))
    kinds = set()
    for image, lines in _by_image(records).items():
        r = lines[0]
        assert r["split"] == split_beside(r["name"], held, salt=SPLIT_SALT) and len(lines) >= 3
        assert not image.startswith("images/symbols/alphabets")
        picture = load_image(out / image)
        assert max(picture.size) <= 96 and picture.mode == "RGB"
        kinds.add(Path(r["folder"]).parts[0])
    assert len(kinds) >= 5 and {"train", "test"} == {r["split"] for r in records}
    assert "gpl-2" in (out / "README.md").read_text().lower()
    _rerun_is_noop(build_stamps, out, limit=40, size=96)


# --- clip art -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem, folders, subject", [
    ("eagle_01", ("animals", "birds"), "eagle"),
    ("pumpkin2_yemu_01", ("food",), "pumpkin"),
    ("sportcar_sergio_luiz_ara_01", ("recreation", "sports"), "sportcar"),
    ("medicina_dottore_archite_01", ("science", "medicine"), "medicina dottore"),
    ("flying_wasp_gerald_g._02", ("animals", "bugs"), "flying wasp"),
    ("bullet_hole_linda_kim_ab", ("tools", "weapons"), "bullet hole"),
    ("closed_box_juliane_krug_r", ("containers",), "closed box"),
    ("harp1_ganson", ("recreation", "music"), "harp"),
    ("tree_-_rpg_map_elements_09", ("signs_and_symbols", "map_symbols"), "tree"),
    ("star_63pt11step", ("shapes", "stars"), "star"),
    ("bordered_c_6", ("recreation", "games", "cards", "bordered"), "six of clubs"),
    ("sm_002", ("people", "stickmen"), "stickmen"),
    ("folder_red_open", ("computer", "icons", "flat-theme"), "folder red open"),
    ("red_flower_03", ("plants", "flowers"), "red flower"),
])
def test_clipart_subject_cleaning(stem, folders, subject):
    from polymodal.data.clipart import clean_subject

    assert clean_subject(stem, folders)[0] == subject


def test_clipart_captions():
    from polymodal.data.clipart import captions_for, clean_subject

    assert captions_for("eagle", "eagle", ("animals", "birds")) == [
        "eagle", "a clip art of an eagle", "birds, animals: eagle"]
    assert clean_subject("star_83pt05step", ("shapes", "stars"))[1] == "an 83-pointed star"
    assert "the flag of chad" in captions_for("chad", "chad", ("signs_and_symbols", "flags", "africa"))


def test_clipart_subset(tmp_path):
    from polymodal.data.clipart import build_clipart

    out = tmp_path / "clipart"
    summary = _fetching(build_clipart, out, limit=40, size=128)
    assert summary["images"] == 40 - len(summary["skipped"]) and summary["duplicates"] > 0
    assert len(summary["category"]) >= 15  # a small subset still spans the categories
    records = read_jsonl(out / CAPTIONS)
    _check_captions(records)
    split_of_subject: dict[str, set[str]] = defaultdict(set)
    for image, lines in _by_image(records).items():
        assert len(lines) >= 2 and len({line["name"] for line in lines}) == 1
        split_of_subject[lines[0]["name"]].add(lines[0]["split"])
        picture = load_image(out / image)
        assert max(picture.size) <= 128 and min(picture.size) >= 1
    assert all(len(s) == 1 for s in split_of_subject.values())  # a subject is wholly train or test
    assert {next(iter(s)) for s in split_of_subject.values()} == {"train", "test"}
    assert "public domain" in (out / "README.md").read_text()
    _rerun_is_noop(build_clipart, out, limit=40, size=128)
