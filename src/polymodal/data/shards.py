"""WebDataset-style tar shards: listing and streaming them (writing: shard_writer.py).

A shard `000000.tar` holds samples as consecutive members sharing a key: `KEY.png` (or
`.jpg`, ...), `KEY.txt` (the caption, UTF-8) and `KEY.json` (the source image path and the
record's metadata). Keys are zero-padded positions, unique over the whole set and sorting in
writing order.

Writing is atomic and resumable. Which sample lands in which shard is decided up front, from
(the pairs, `per_shard`, `shuffle`, `seed`) alone; its fingerprint goes to `.shards-plan.json`
before any shard. Each shard is written as `NNNNNN.tar.tmp`, flushed to disk and renamed, so a
final name only ever holds a complete shard. A rerun with the same plan keeps the shards that
exist and writes the others (a leftover `.tmp` is overwritten); `shards.json`, the manifest, is
written last, so its presence means the set is complete. A different plan in a used folder is
refused rather than mixed.

Reading streams: `tarfile` in `r|*` mode, one member in memory at a time, nothing extracted.
A sample that is incomplete or corrupt, or a shard that is truncated or unreadable, becomes a
`Sample` with `error` set, so the reader can skip it, count it and go on.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MANIFEST = "shards.json"
PLAN = ".shards-plan.json"
FORMAT = "polymodal-shards/1"
MAX_MEMBER_BYTES = 256 << 20  # one member larger than this is refused, not read into memory
_MAX_EXPANSION = 1_000_000


# --- shard lists ----------------------------------------------------------------------------------


_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")


def _range(body: str) -> list[str] | None:
    m = _RANGE.match(body)
    if not m:
        return None
    first, last, step = m.group(1), m.group(2), m.group(3)
    a, b = int(first), int(last)
    step = abs(int(step)) if step else 1
    if step == 0:
        raise ValueError(f"brace range {{{body}}} has a step of 0")
    if abs(b - a) // step + 1 > _MAX_EXPANSION:
        raise ValueError(f"brace range {{{body}}} expands to more than {_MAX_EXPANSION} names")
    padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (first, last))
    width = max(len(first), len(last)) if padded else 0
    values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
    return [f"{v:0{width}d}" for v in values]


def expand_braces(pattern: str) -> list[str]:
    """Shell brace expansion: `a{1..3}` -> a1 a2 a3 (`{000..009}` keeps the zero padding, an
    optional step `{0..10..5}`), `x{a,b}y` -> xay xby; nested and several groups multiply. Braces
    that hold neither a range nor a comma stay as they are."""
    start = pattern.find("{")
    while start != -1:
        depth, end, commas = 0, -1, []
        for i in range(start, len(pattern)):
            ch = pattern[i]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    end = i
                    break
            elif ch == "," and depth == 1:
                commas.append(i)
        if end == -1:
            break  # unmatched "{": the rest is literal
        body = pattern[start + 1 : end]
        alternatives = _range(body)
        if alternatives is None and commas:
            cuts = [start, *commas, end]
            alternatives = [pattern[cuts[k] + 1 : cuts[k + 1]] for k in range(len(cuts) - 1)]
        if alternatives is None:
            start = pattern.find("{", start + 1)  # a literal "{...}": look further on
            continue
        prefix, suffix = pattern[:start], pattern[end + 1 :]
        out = [prefix + tail for alt in alternatives for tail in expand_braces(alt + suffix)]
        if len(out) > _MAX_EXPANSION:
            raise ValueError(f"{pattern!r} expands to more than {_MAX_EXPANSION} names")
        return out
    return [pattern]


def _is_shard(path: Path) -> bool:
    return path.is_file() and path.name.endswith(SHARD_SUFFIXES)


def list_shards(source: str | Path | Iterable[str | Path]) -> list[Path]:
    """The shard files of `source`: a folder (its `*.tar`, `*.tar.gz`, `*.tgz`, sorted; `.tmp`
    files are never listed), a glob (`data/*.tar`), brace notation (`data/{000000..000009}.tar`,
    each name may itself be a glob), one file, or a list of any of these. Raises
    FileNotFoundError when nothing matches or a named shard does not exist."""
    if not isinstance(source, (str, os.PathLike)):
        paths = [p for item in source for p in list_shards(item)]
        if not paths:
            raise FileNotFoundError("no shards: the list of sources is empty")
        return paths
    text = str(source)
    if Path(text).is_dir():
        paths = sorted(p for p in Path(text).iterdir() if _is_shard(p))
        if not paths:
            raise FileNotFoundError(f"{text}: no shards ({', '.join('*' + s for s in SHARD_SUFFIXES)})")
        return paths
    paths, missing = [], []
    for name in expand_braces(text):
        if glob.has_magic(name):
            paths += [Path(p) for p in sorted(glob.glob(name)) if not p.endswith(".tmp")]
        elif Path(name).is_file():
            paths.append(Path(name))
        else:
            missing.append(name)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{text}: no such shard {', '.join(missing[:3])}{more}")
    if not paths:
        raise FileNotFoundError(f"{text}: no shards match")
    return paths


# --- reading --------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One sample of a shard; `error` is set (and the payload may be missing) when it is unusable.
    A shard-level failure (unreadable, truncated, corrupt header) is a Sample with key ""."""

    key: str
    shard: str
    image: bytes | None = None
    image_ext: str = ""
    text: str | None = None
    meta: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _probe_class() -> type[tarfile.TarInfo]:
    """A TarInfo that remembers the header error that ended the archive: `tarfile` stops
    silently on an end-of-archive block, but also on a truncated or garbled header."""

    class Probe(tarfile.TarInfo):
        stop: Exception | None = None

        @classmethod
        def frombuf(cls, buf, encoding, errors):
            try:
                return super().frombuf(buf, encoding, errors)
            except tarfile.HeaderError as e:
                Probe.stop = e
                raise

    return Probe


def _members(path: Path, max_member_bytes: int) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(name, data, error) of each regular member, streaming; the last one may be ("", None,
    error) for a shard that could not be read to its end."""
    probe = _probe_class()
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the `with f` below; failing to open is a bad shard
    except OSError as e:
        yield "", None, f"cannot open ({e.strerror})"
        return
    with f:
        try:
            tar = tarfile.open(fileobj=f, mode="r|*", tarinfo=probe)  # noqa: SIM115 - `with tar` below
        except Exception as e:  # tarfile / zlib / bz2 / lzma raise many types
            yield "", None, f"not a readable tar ({_one_line(e)})"
            return
        with tar:
            while True:
                try:
                    member = tar.next()
                    tar.members = []  # stream mode keeps every header otherwise
                    if member is None:
                        break
                    if not member.isfile():
                        continue
                    if member.size > max_member_bytes:
                        yield member.name, None, f"{member.size} bytes, over the cap of {max_member_bytes}"
                        continue
                    reader = tar.extractfile(member)
                    data = reader.read() if reader is not None else b""
                except Exception as e:  # truncated data, bad checksum, decompression error
                    yield "", None, f"truncated or corrupt ({_one_line(e)})"
                    return
                yield member.name, data, None
    stop = probe.stop
    if isinstance(stop, tarfile.EOFHeaderError):
        return  # the end-of-archive block
    if isinstance(stop, tarfile.EmptyHeaderError):
        yield "", None, "truncated (ends without the end-of-archive block)"
    elif stop is not None:
        yield "", None, f"truncated or corrupt ({_one_line(stop)})"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _split(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the path up to the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _sample(key: str, shard: str, parts: dict[str, bytes], error: str | None) -> Sample:
    sample = Sample(key, shard, error=error)
    if error:
        return sample
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None:
        sample.error = "no image member"
        return sample
    if "txt" not in parts:
        sample.error = "no .txt member"
        return sample
    try:
        sample.text = parts["txt"].decode("utf-8")
    except UnicodeDecodeError:
        sample.error = ".txt is not valid UTF-8"
        return sample
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = None
        if not isinstance(meta, dict):
            sample.error = ".json is not a JSON object"
            return sample
        sample.meta = meta
    sample.image, sample.image_ext = parts[ext], ext
    return sample


def iter_samples(path: str | Path, *, max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[Sample]:
    """Every sample of one shard, in member order, the unusable ones with `error` set."""
    path = Path(path)
    shard = str(path)
    key, parts, error = None, {}, None
    for name, data, problem in _members(path, max_member_bytes):
        if not name:  # the shard ends early; the sample being read, if unfinished, is the loss
            if key is not None:
                sample = _sample(key, shard, parts, error)
                if sample.ok:
                    yield sample
                    key = None
            yield Sample(key or "", shard, error=problem)
            return
        k, ext = _split(name)
        if k != key:
            if key is not None:
                yield _sample(key, shard, parts, error)
            key, parts, error = k, {}, None
        if problem:
            error = f"{name}: {problem}"
        elif ext in parts:
            error = f"{name}: member repeated"
        else:
            parts[ext] = data
    if key is not None:
        yield _sample(key, shard, parts, error)


class ShardReader:
    """The good samples of a set of shards, in order; the rest are counted in `skipped` and
    listed in `problems` as ("shard:key", reason)."""

    def __init__(self, source, *, max_member_bytes: int = MAX_MEMBER_BYTES):
        self.shards = list_shards(source)
        self.max_member_bytes = max_member_bytes
        self.skipped = 0
        self.problems: list[tuple[str, str]] = []

    def __iter__(self) -> Iterator[Sample]:
        for shard in self.shards:
            for sample in iter_samples(shard, max_member_bytes=self.max_member_bytes):
                if sample.ok:
                    yield sample
                else:
                    self.skipped += 1
                    self.problems.append((f"{shard}:{sample.key}", sample.error))


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def read_manifest(folder: str | Path) -> dict | None:
    """The `shards.json` of a folder written by `write_shards`; None if the set is unfinished."""
    return _read_json(Path(folder) / MANIFEST)
