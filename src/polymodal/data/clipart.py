"""Open Clip Art Library pictures (Debian's openclipart-png, public domain) with captions from
their category folders and their cleaned subject names, balanced across categories, with a test
split that holds out whole subjects.

The package is fetched with `apt-get download` into the cache (no root install; when apt is
missing or fails, straight from the Debian pool over HTTP) and unpacked with `dpkg -x` (or a
small ar + tar reader where dpkg is missing); its SHA-256 is pinned.

File names follow the library's 2005 upload scheme `<title>_<author>` cut to 24 characters,
then a counter: `pumpkin2_yemu_01`, `sportcar_sergio_luiz_ara_01`, `medicina_dottore_archite_01`.
`clean_subject` undoes it:

1. drop the counter (`_01`, `_01a`, `_r`, trailing digits) and ".svg" left in some names;
2. drop the author: the longest run of trailing words that is a known author (AUTHORS, the
   `dc:creator` of every file in openclipart-svg 0.18 whose name shows up in a file name, plus
   the aliases "ganson" and "aj"), or, when the name was cut at 24 characters, the start of one;
   a name that was cut also loses a last fragment of one or two letters;
3. drop digits glued to words ("pumpkin2" -> "pumpkin"), pure numbers and noise words
   ("bw", "gnome", "stock", "aiga", hex hashes); separators become spaces; what follows
   " - " goes ("tree_-_rpg_map_elements_09" -> "tree");
4. hand rules: `star_63pt11step` -> "star" ("a 63-pointed star"), playing cards
   `bordered_c_6` -> "six of clubs", card backs and jokers; a name left with under three
   letters takes its folder's name ("sm_002" in people/stickmen -> "stickmen").

Pictures are composited onto white, downscaled to fit `size` (never enlarged) and written as
RGB PNG. Exact duplicates (the same bytes filed in two folders) are kept once.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from pathlib import Path

from polymodal.data.common import (
    CAPTIONS,
    article,
    cache_dir,
    check_build,
    dedupe,
    fetch_deb,
    file_digest,
    load_drawing,
    save_png,
    split_of,
    summarise,
    take,
    track,
    unit_hash,
    write_jsonl,
    write_readme,
)
from polymodal.processing.image import ImageError

PACKAGE = "openclipart-png"
VERSION = "1:0.18+dfsg-19"
SHA256 = "f07f1545a2970c2cf3fa339bc2405da1a95cf2b1827bfa05bf73eb1c20291c02"
POOL_URL = "http://deb.debian.org/debian/pool/main/o/openclipart/openclipart-png_0.18+dfsg-19_all.deb"
LICENCE = ("public domain (Creative Commons Public Domain Dedication, per the Debian package's "
           "copyright file; each picture's author is credited on openclipart.org)")
SPLIT_SALT = "clipart-v1"
MIN_SIDE = 24  # pictures whose longer side is shorter than this are broken renders
CUT = 22  # a name this long (before its counter) was probably cut at 24 characters

_AUTHOR_NAMES = """
    a.j._ashton abiclipart afief_halumi aitor_avila aj aj_ashton alberto_piccinno alejandro_tejada
    alex_fernandez alex_kuehne alexander_d._thorp alexandru_popescu ali_hussnain_shah amos andrea_bianchini
    andreas_nilsson andrei_z andremarcel.de andrew_fitzsimon andy_burns andy_fitzsimon angelo_gelmi ani_ani
    anita anonmoos anonymous anthony_liekens anton_frolich anton_yu arago21 architetto_francesco_rollandin
    arjen_meijer arn astrid_graeber aubanel_monnier benji_park bob_dagit borja_bravo bradley_whittington
    bram_gron brice_boyer carlos_katastrofsky cedric_bosdonnat celso_junior charles_mccolm chaspo
    chris_hinsley chris_kempson christian_h christoph_brill clemente corey_burger costea_bogdan dan_gerhards
    daniel_mcrae daniel_steele danny_allen darek_adamkiewicz darkon dave_pena dave_reckoning davek
    david_klann david_wislon davide_pesenti denco dennis_bond dennis_rutjes didier_fabert dirk_struve
    domas_jokubauskis dudziak_tomek durex86 einar_faanes emule.org enrique_meza_c erich_schubert erik_postma
    erwan etienne_bersac ezechiele fabio_olivo fco._andrade fearzip federico_zenith felipe_maciel felipescu
    filip_mielniczuk francesco_rollandin frank_warttig frederic_moser fredrik_holmqvist frouke
    gabriel_lo_iacono gabrielle_nowicki galion_public_library ganson geraint_luff gerald_g ghuul gino_rivera
    giuseppe_mascolo glenn_rolland gmv goneri_le_bouder graig_ryan_smith guido_fioravanti guillaume_boitel
    guziec hans_deragon hardi havok_redhand.pl igor_krizanovskij ingoenius israel_cabrera jaime_sanchez
    james_birkett james_kilfiger jamin_ellis janet_theobroma jarno_vasamaa jasper_van_de_gronde
    jean_maurice_le_clech jean_victor_balin jeff_simpson jeff_walden jesper_zedlitz joel_lehtonen
    joel_montes_de_oca joerg_rosenbauer joeseph_teed john_rariden jon_campbell jon_phillips jonadab
    jonadab_the_unsightly_one jonathan_dietrich jonvdveen jordan_wiens jorkon juliane_krug jure_kodzoman
    jurgen jurgen_gaeremyn k_yager karl_bartel kevin_c._wixson kevin_cowtan kexi_team kilian_valkhof kimiko
    konstantin_rotkevich kurt_cagle kurt_nordstrom lakshman_poonyth lauris_kaplinski leif_lodahl
    leigh_purdie linda_kim lion_kimbro loic_corwin_richard lorenzo_luengo loz luca_negrini
    lumen_design_studio magnus_erik_lehnsherr marcelo_caiafa marcelo_mathias_lima marcelo_staudt marcin_wilk
    mariusz_kedzierski mark_neary martin_kozak martin_schmidt_linden massimo_aiello mateya matt_todd
    matthew_gates matthew_loewen matthew_wardrop matthew_welch mauro_olivo mazdac merzok michael_barg
    michael_breuer michael_hart michael_jasonsmith michael_moore michael_tunnicliffe miguel_sanchez
    mike_honeychurch mike_powers_jr mike_smick mikhail_a.medvedev mimooh mirjam_meijer mirko_maischberger
    mitchell_johnson mo muji multimotyl nathan_eady nathan_hawkes neil_turner nicolas_clementz nicolas_gagliani
    nicu_buculei niels_epting nubldoff nurbldoff nurbldoff_ksc olivier_boyer olivier_pilot omar_abo_namous
    openclipart orbu orlando_karam patricia_fidi paul_jensen pcch peterm petri_lummemaki phentex
    philippe_colin ralf_stephan raphael_seban renante_tomas revdoug richard_torkar rick rick_beton rikva
    risto_pekkala rob_lucas robert_seitz roberto_u rodrigo_tjader rollandin_francesco roman_bertle romus
    ron_golan rory_mccann ross_merrigan ruairi_hann ruud_steltenpool ryan_phillips s_rgio_luiz_araujo_silva
    saint santiago_diaz saurabh_nanda sek sergio_luiz_araujo_silva seth_yastrov shandy_brown sherrera
    snuatautisticidotorg starexterminator stefan_alfredsson stefan_bazelkov stefan_graubner stefan_illner
    steffen_gluckselig stepan_klimov steve_doonan stuart_moore susan_park t._eitel tanguy_jacq
    tatiana_coutinho terry_brown tess_brady teudimundo the_mad_processor the_structorr theerud_lawtrakul
    thomas_hicks timothy_white tobias_jakobs toh_yen_cheng tom_hung tom_webb tristan_le_toullec uliphant
    utrescu valessio_soares_de_brito vermin vikingdread virginie_quesnay vladimir_hernandez wes_deboer wilc
    william_page yemu yogesh_kanitkar yves_guillou zazou
"""
AUTHORS = frozenset(re.sub(r"\.(?=_|$)", "", a) for a in _AUTHOR_NAMES.split())  # "gerald_g." -> "gerald_g"
NOISE = {"bw", "svg", "png", "gnome", "gtk", "stock", "aiga", "kde", "mime", "fs", "hash"}
SUITS = {"c": "clubs", "d": "diamonds", "h": "hearts", "s": "spades"}
RANKS = {"a": "ace", "j": "jack", "q": "queen", "k": "king", "2": "two", "3": "three", "4": "four",
         "5": "five", "6": "six", "7": "seven", "8": "eight", "9": "nine", "10": "ten"}


# --- fetching ----------------------------------------------------------------------------


def fetch_clipart(cache: Path) -> Path:
    """The folder of category folders of PNGs, fetched and unpacked into the cache once."""
    folder = fetch_deb(PACKAGE, VERSION, SHA256, POOL_URL, cache,
                       {"openclipart/png": "png", f"doc/{PACKAGE}/copyright": "copyright"})
    return folder / "png"


# --- names -------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return [w.strip(".") for w in re.split(r"[-_\s]+", text.lower()) if w.strip(".")]


def _is_author(words: list[str], cut: bool) -> bool:
    name = "_".join(words)
    return name in AUTHORS or (cut and len(name) >= 3 and any(a.startswith(name) for a in AUTHORS))


def _drop_author(words: list[str], cut: bool) -> list[str]:
    for k in range(1, len(words)):  # the longest run of trailing words first; never the first word
        if _is_author(words[k:], cut):
            return words[:k]
    return words


def clean_subject(stem: str, folders: tuple[str, ...] = ()) -> tuple[str, str]:
    """(subject, phrase) of a file name: 'pumpkin2_yemu_01' -> ('pumpkin', 'pumpkin');
    'star_63pt11step' -> ('star', 'a 63-pointed star'); 'bordered_c_6' -> ('six of clubs',
    'the six of clubs'). The subject is the split key; the phrase goes into captions."""
    s = stem.lower().replace(".svg", "_")
    if m := re.fullmatch(r"star_(\d+)pt\d+step", s):
        points = int(m.group(1))
        return "star", f"{'an' if points in (8, 11, 18) or 80 <= points < 90 else 'a'} {points}-pointed star"
    if "cards" in folders:
        if m := re.fullmatch(r"[a-z]+_([cdhs])_(10|[2-9ajqk])", s):
            subject = f"{RANKS[m.group(2)]} of {SUITS[m.group(1)]}"
            return subject, f"the {subject}"
        if m := re.fullmatch(r"[a-z]+_jk_([br])", s):
            subject = f"{'black' if m.group(1) == 'b' else 'red'} joker"
            return subject, f"a {subject} playing card"
        if re.fullmatch(r"back\d+", s):
            return "card back", "the back of a playing card"
    s = re.sub(r"^clipart_by_.+?_-_", "", s)  # "clipart_by_nicu_buculei_-_baloon1_04"
    s = re.sub(r"(?<=.)_-_.*", "", s)  # "tree_-_rpg_map_elements_09", "lock_-_open_afief_halumi"
    words = _words(s)
    while len(words) > 1 and re.fullmatch(r"\d{1,3}[a-z]?", words[-1]):  # counters: 01, 01a, 2
        words.pop()
    if words:
        words[-1] = re.sub(r"(?<=[a-z])\d+$", "", words[-1])  # "vasamaa2"
    cut = len("_".join(words)) >= CUT
    if len(words) > 2 and len(words[-1]) <= 2 and (cut or _drop_author(words[:-1], False) != words[:-1]):
        words.pop()  # the fragment a cut left, or a variant mark after an author ("linda_kim_ab")
    words = _drop_author(words, cut)
    words = [re.sub(r"(?<=[a-z])\d+$", "", w) for w in words]  # "pumpkin2" -> "pumpkin"
    words = [w for w in words if w and not w.isdigit() and w not in NOISE and not w.startswith("0x")]
    subject = " ".join(words)
    if sum(c.isalpha() for c in subject) < 3:
        subject = folders[-1].replace("_", " ").replace("-", " ") if folders else subject or "clip art"
    return subject, subject


def captions_for(subject: str, phrase: str, folders: tuple[str, ...]) -> list[str]:
    """'eagle', 'a clip art of an eagle', 'birds, animals: eagle' (and 'the flag of ...')."""
    path = ", ".join(f.replace("_", " ").replace("-", " ") for f in reversed(folders))
    texts = [phrase if phrase != subject else subject, f"a clip art of {article(phrase)}"]
    if path:
        texts.append(f"{path}: {phrase}")
    if "flags" in folders and "semaphore" not in folders and "flag" not in subject.split():
        texts.append(f"the flag of {subject}")
    return dedupe(texts)


# --- the builder -------------------------------------------------------------------------


def _interleave(queues: list[list[str]]) -> list[str]:
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def _select(files: list[str], subject_of: dict[str, str], cap: int | None,
            subject_cap: int | None) -> list[str]:
    """At most `cap` files per top-level category and `subject_cap` per subject, taken in turn
    from each folder of the category (each folder in a fixed hashed order), so the 1,378 stars
    do not fill shapes/; then the categories interleaved, so any prefix spans them all."""
    by_category: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for rel in files:
        by_category[rel.split("/", 1)[0]][rel.rsplit("/", 1)[0]].append(rel)
    queues, per_subject = [], defaultdict(int)
    for _, folders in sorted(by_category.items()):
        order = _interleave([sorted(v, key=lambda r: (unit_hash(f"clip:{r}"), r)) for _, v in sorted(folders.items())])
        kept = []
        for rel in order:
            if (subject_cap is None or per_subject[subject_of[rel]] < subject_cap) and (cap is None or len(kept) < cap):
                per_subject[subject_of[rel]] += 1
                kept.append(rel)
        queues.append(kept)
    return _interleave(queues)


def build_clipart(out, *, cache=None, size: int | None = 256, per_category_cap: int | None = 400,
                  per_subject_cap: int | None = 20, progress: bool = False, limit: int | None = None) -> dict:
    """Build the clip-art caption set in `out`; return counts per split and category.

    `size`: downscale each picture to fit size x size (None keeps the original pixels).
    `per_category_cap`: at most this many pictures per top-level category (None: all).
    `per_subject_cap`: at most this many pictures per cleaned subject (None: all); without it
    the 1,378 generated "star"s would make up most of shapes/ and, held out together, a third
    of the test split.
    `limit`: at most this many pictures in all, spread over the categories and both splits.
    """
    started = time.perf_counter()
    out, cache = Path(out), cache_dir(cache)
    png = fetch_clipart(cache)
    files, seen = [], set()
    for path in sorted(png.rglob("*.png")):
        digest = file_digest(path)
        if digest not in seen:  # the same picture filed twice is kept once, at its first path
            seen.add(digest)
            files.append(path.relative_to(png).as_posix())
    duplicates = sum(1 for _ in png.rglob("*.png")) - len(files)
    names = {}
    for rel in files:
        folders = tuple(rel.split("/")[:-1])
        names[rel] = (folders, *clean_subject(rel.rsplit("/", 1)[-1][:-4], folders))
    subjects = {r: v[1] for r, v in names.items()}
    chosen = take(_select(files, subjects, per_category_cap, per_subject_cap), limit,
                  lambda r: split_of(names[r][1], salt=SPLIT_SALT) == "test")

    check_build(out, "clipart", {"size": size})
    skipped, records, written = [], [], 0
    for rel in track(chosen, f"clipart: {len(chosen)} pictures", progress):
        folders, subject, phrase = names[rel]
        target = out / "images" / rel
        if not target.exists():
            try:
                save_png(load_drawing(png / rel, size, min_side=MIN_SIDE), target)
                written += 1
            except (ImageError, OSError, ValueError) as e:
                skipped.append(str(e))
                continue
        for text in captions_for(subject, phrase, folders):
            records.append({
                "image": f"images/{rel}", "text": text, "split": split_of(subject, salt=SPLIT_SALT),
                "name": subject, "category": folders[0] if folders else "unsorted",
                "path": "/".join(folders), "source": PACKAGE, "file": rel,
            })
    records.sort(key=lambda r: (r["image"], r["text"]))
    write_jsonl(out / CAPTIONS, records)
    summary = summarise(records, by=("category",))
    write_readme(
        out, title="Clip-art caption set (polymodal)",
        about="Pictures from the Open Clip Art Library (2005 snapshot, as packaged by Debian), "
              f"composited on white and downscaled to fit {size or 'their original'} pixels, at most "
              f"{per_category_cap or 'all'} per top-level category and {per_subject_cap or 'all'} per subject, "
              "each with several lower-case captions "
              "from its cleaned subject name and its category folders. The test split holds out whole "
              "subjects (about 10%, by a SHA-256 hash of the cleaned name). `name` is the subject, "
              "`category` the top-level folder, `path` all folders, `file` the source file.",
        sources=[{"name": f"{PACKAGE} (Debian)", "version": VERSION,
                  "url": "https://packages.debian.org/bookworm/openclipart-png", "licence": LICENCE,
                  "terms": f"SHA-256 of the .deb: {SHA256}"}],
        summary=summary,
        notes=[f"{duplicates} exact duplicates left out; pictures that do not load or are under "
               f"{MIN_SIDE} pixels are skipped.", "Built with `polymodal.data.clipart.build_clipart`"
               + (f" (limit={limit})." if limit is not None else ".")],
    )
    summary.update(written=written, skipped=skipped, duplicates=duplicates, version=VERSION,
                   seconds=round(time.perf_counter() - started, 2), out=str(out))
    return summary
