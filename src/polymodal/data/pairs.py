"""Image-text pairs from a folder: images plus a captions file.

The folder holds the images (any layout) and one captions file:

- `captions.jsonl`: one JSON object a line, `{"image": "rel/path.png", "text": "..."}`;
- `captions.csv`: a header row with `image` and `text` columns (quoted fields may hold
  commas, quotes and newlines, as the csv module reads them).

Several records may name the same image: one pair per caption. Other keys (JSON) or
columns (CSV) are kept as the pair's metadata; a `split` key filters with
`PairDataset(root, split="train")`: when any record has a `split`, only the records whose
split is "train" are kept (one without a split is in no split); when none has one, `split` is
ignored and every record kept (`dataset.split` is then None).

A bad record (not JSON, not an object, a key missing or not a string, an image path that is
absolute or climbs out of the folder with `..`, bytes that are not UTF-8) never stops the load:
it is skipped, listed in `PairDataset.problems` as (line, reason), and one warning sums them
up. Whether the image file exists or decodes is not checked here (that costs a read per
image); the loader and the shard writer skip and count those. The path check is by name:
symbolic links inside the folder are followed, as its owner made them.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

CAPTION_FILES = ("captions.jsonl", "captions.csv")
_DRIVE = re.compile(r"^[A-Za-z]:")  # C:\ or C:/ - absolute on Windows
_SHOWN = 5  # problems quoted in the warning


@dataclass(frozen=True, slots=True)
class Pair:
    """One record of the captions file."""

    image: str  # POSIX path relative to the dataset root, normalised ("./a/b.png" -> "a/b.png")
    text: str
    line: int  # line of the captions file the record starts on (1-based)
    meta: dict = field(default_factory=dict)  # the record's other keys


def safe_relpath(value: str) -> str:
    """`value` as a normalised relative POSIX path inside the root; ValueError if it is empty,
    absolute (`/x`, `\\x`, `C:`) or climbs out of the root (any `..` part)."""
    if not value.strip():
        raise ValueError("empty image path")
    if value.startswith(("/", "\\")) or _DRIVE.match(value):
        raise ValueError(f"image path {value!r} is absolute")
    parts = re.split(r"[/\\]", value)
    if ".." in parts:
        raise ValueError(f"image path {value!r} leaves the dataset folder ('..')")
    if "\0" in value:
        raise ValueError("image path holds a NUL byte")
    rel = str(PurePosixPath(*[p for p in parts if p not in ("", ".")])) if parts else ""
    if rel in ("", "."):
        raise ValueError(f"image path {value!r} names the folder itself")
    return rel


def _record(obj: dict, line: int) -> Pair:
    image, text = obj.get("image"), obj.get("text")
    if image is None or text is None:
        missing = [k for k in ("image", "text") if obj.get(k) is None]
        raise ValueError(f"missing {' and '.join(repr(k) for k in missing)}")
    for key, value in (("image", image), ("text", text)):
        if not isinstance(value, str):
            raise ValueError(f"{key!r} is a {type(value).__name__}, not a string")
        if any("\udc80" <= ch <= "\udcff" for ch in value):
            raise ValueError(f"{key!r} is not valid UTF-8")
    meta = {k: v for k, v in obj.items() if k not in ("image", "text")}
    return Pair(safe_relpath(image), text, line, meta)


def _read_jsonl(path: Path, problems: list[tuple[int, str]]) -> list[Pair]:
    pairs = []
    with open(path, "rb") as f:  # bytes, so one line of bad UTF-8 costs one line, not the file
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                problems.append((number, "not valid UTF-8"))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                problems.append((number, f"bad JSON ({e.msg}, column {e.colno})"))
                continue
            if not isinstance(obj, dict):
                problems.append((number, f"a JSON {type(obj).__name__}, not an object"))
                continue
            try:
                pairs.append(_record(obj, number))
            except ValueError as e:
                problems.append((number, str(e)))
    return pairs


def _read_csv(path: Path, problems: list[tuple[int, str]]) -> list[Pair]:
    pairs = []
    # surrogateescape: undecodable bytes survive as lone surrogates, refused per record in `_record`
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return pairs
        except csv.Error as e:
            raise ValueError(f"{path}: line 1: unreadable CSV header ({e})") from None
        header = [h.strip() for h in header]
        missing = [k for k in ("image", "text") if k not in header]
        if missing:
            raise ValueError(f"{path}: line 1: the header {header} has no {' or '.join(missing)} column")
        if len(set(header)) != len(header):
            raise ValueError(f"{path}: line 1: the header {header} repeats a column")
        end = reader.line_num
        while True:
            start = end + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                end = reader.line_num
                problems.append((start, f"bad CSV ({e})"))
                continue
            end = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                problems.append((start, f"{len(row)} fields, the header has {len(header)}"))
                continue
            try:
                pairs.append(_record(dict(zip(header, row, strict=True)), start))
            except ValueError as e:
                problems.append((start, str(e)))
    return pairs


class PairDataset:
    """Image-text pairs of a folder; map-style: `dataset[i] -> (image_path, text)`.

    root: the folder, or its captions file (`captions.jsonl` or `captions.csv`; image paths are
    relative to the file's folder). split: keep only the records whose `split` is this value
    (ignored when no record has a split).
    """

    def __init__(self, root: str | Path, split: str | None = None):
        root = Path(root)
        if root.is_file():
            self.captions_file, self.root = root, root.parent
        elif root.is_dir():
            found = [root / name for name in CAPTION_FILES if (root / name).is_file()]
            if not found:
                raise FileNotFoundError(f"{root}: no {' or '.join(CAPTION_FILES)} in this folder")
            if len(found) > 1:
                raise ValueError(f"{root}: both {found[0].name} and {found[1].name}; keep one")
            self.captions_file, self.root = found[0], root
        else:
            raise FileNotFoundError(f"{root}: no such folder or captions file")
        self.problems: list[tuple[int, str]] = []
        reader = _read_csv if self.captions_file.suffix == ".csv" else _read_jsonl
        pairs = reader(self.captions_file, self.problems)
        # A split filters only data that has splits: with none, every record is kept (split None).
        self.split = split if any("split" in p.meta for p in pairs) else None
        if self.split is not None:
            pairs = [p for p in pairs if p.meta.get("split") == split]
        self.pairs: list[Pair] = pairs
        self._by_image: dict[str, list[int]] = {}
        for i, pair in enumerate(pairs):
            self._by_image.setdefault(pair.image, []).append(i)
        if self.problems:
            shown = "; ".join(f"line {n}: {reason}" for n, reason in self.problems[:_SHOWN])
            more = f"; and {len(self.problems) - _SHOWN} more" if len(self.problems) > _SHOWN else ""
            warnings.warn(
                f"{self.captions_file}: skipped {len(self.problems)} bad record(s) "
                f"(see PairDataset.problems): {shown}{more}",
                stacklevel=2,
            )

    def __repr__(self) -> str:
        split = f", split={self.split!r}" if self.split is not None else ""
        return (
            f"PairDataset({str(self.root)!r}{split}: {len(self)} pairs, {len(self._by_image)} images, "
            f"{len(self.problems)} skipped)"
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Path, str]:
        pair = self.pairs[i]
        return self.root / pair.image, pair.text

    def images(self) -> list[Path]:
        """Each image once, in the order the captions file first names it."""
        return [self.root / image for image in self._by_image]

    def captions_of(self, image: str | Path) -> list[str]:
        """The captions of one image: a path relative to the root, or the path `images()` gives."""
        path = Path(image)
        candidates = [] if path.is_absolute() else [path]
        for base in (self.root, self.root.resolve()):
            if path.is_relative_to(base):
                candidates.append(path.relative_to(base))
        for candidate in candidates:
            indices = self._by_image.get(candidate.as_posix().removeprefix("./"))
            if indices:
                return [self.pairs[i].text for i in indices]
        return []
