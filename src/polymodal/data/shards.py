"""WebDataset-style tar shards: writing them from a `PairDataset`, listing and streaming them.

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
import hashlib
import io
import json
import math
import os
import re
import stat
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polymodal.data.pairs import Pair, PairDataset

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


# --- writing --------------------------------------------------------------------------------------

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF8", "gif"), (b"BM", "bmp"),
          (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))


def _sniff(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(12)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if head.startswith(magic)), None)


def _check(root: Path, pair: Pair) -> tuple[Path, str]:
    """The image file and member extension of a pair, or ValueError(reason) to skip it; stat
    and a 12-byte read at most, never a decode (the loader skips images that do not decode)."""
    if not pair.text.strip():
        raise ValueError("empty text")
    path = root / pair.image
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{pair.image}: not a file")
        if st.st_size == 0:
            raise ValueError(f"{pair.image}: empty file (0 bytes)")
        ext = path.suffix.lower().lstrip(".")
        ext = "jpg" if ext == "jpeg" else ext
        if ext not in IMAGE_EXTS:
            ext = _sniff(path)
            if ext is None:
                raise ValueError(f"{pair.image}: not a known image type")
    except OSError as e:
        raise ValueError(f"{pair.image}: {e.strerror or 'cannot read'}") from None
    return path, ext


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: same input, same bytes
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, good: list, skipped: list[dict]) -> list:
    """Write one shard through `path.tmp` and an atomic rename; return the samples written."""
    tmp = path.with_name(path.name + ".tmp")
    written = []
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for key, pair, image, ext in good:
                try:
                    data = image.read_bytes()
                except OSError as e:  # vanished or unreadable since `_check`
                    reason = f"{pair.image}: {e.strerror or 'cannot read'}"
                    skipped.append({"line": pair.line, "image": pair.image, "reason": reason})
                    continue
                _add(tar, f"{key}.{ext}", data)
                _add(tar, f"{key}.txt", pair.text.encode("utf-8"))
                meta = {**pair.meta, "image": pair.image}
                _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False, default=str).encode())
                written.append(key)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return written


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class _Plan:
    order: np.ndarray  # position in the shard set -> index in the dataset
    per_shard: int
    width: int  # digits of a key
    fingerprint: str

    @property
    def count(self) -> int:
        return math.ceil(len(self.order) / self.per_shard)

    def name(self, j: int) -> str:
        return f"{j:06d}.tar"

    def positions(self, j: int) -> range:
        return range(j * self.per_shard, min((j + 1) * self.per_shard, len(self.order)))


def _plan(dataset: PairDataset, per_shard: int, shuffle: bool, seed: int) -> _Plan:
    n = len(dataset)
    order = np.random.default_rng([seed]).permutation(n) if shuffle else np.arange(n)
    h = hashlib.sha256(json.dumps([FORMAT, n, per_shard, shuffle, seed]).encode())
    for pair in dataset.pairs:
        h.update(json.dumps([pair.image, pair.text, pair.meta], sort_keys=True, default=str).encode())
    return _Plan(order, per_shard, max(9, len(str(n - 1))), h.hexdigest())


def write_shards(
    dataset: PairDataset | str | Path,
    out_dir: str | Path,
    per_shard: int = 1000,
    progress: bool = False,
    *,
    shuffle: bool = True,
    seed: int = 0,
) -> list[Path]:
    """Write the pairs of `dataset` (a PairDataset or its folder) as tar shards of `per_shard`
    samples into `out_dir`; return the shard paths in order. One sample per pair (an image with
    three captions is stored three times). `shuffle` (default on) writes the pairs in an order
    drawn from `seed`, so each shard is a mix of the whole set and the captions of one image are
    spread apart, which a streaming shuffle buffer alone could not do. Pairs whose image is
    missing, unreadable, empty or of an unknown type, or whose text is empty, are skipped and
    listed in the manifest (`skipped`) and in one warning. See the module doc for resumption."""
    if not isinstance(dataset, PairDataset):
        dataset = PairDataset(dataset)
    if per_shard < 1:
        raise ValueError(f"per_shard must be at least 1, got {per_shard}")
    if len(dataset) == 0:
        raise ValueError(f"{dataset.root}: no pairs to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(dataset, per_shard, shuffle, seed)
    paths = [out / plan.name(j) for j in range(plan.count)]
    manifest = _read_json(out / MANIFEST)
    if manifest is not None:
        if manifest.get("fingerprint") != plan.fingerprint:
            raise ValueError(
                f"{out}: {MANIFEST} describes other shards (another dataset, per_shard, shuffle or seed); "
                "write to an empty folder"
            )
        if all(p.is_file() for p in paths):
            return paths
    marker = _read_json(out / PLAN)
    if marker is None and manifest is None:
        strangers = sorted(p.name for p in out.iterdir() if _is_shard(p))
        if strangers:
            raise ValueError(f"{out}: holds shards written by something else ({strangers[0]}, ...); "
                             "write to an empty folder")
        _write_json(out / PLAN, {"format": FORMAT, "fingerprint": plan.fingerprint})
    elif marker is not None and marker.get("fingerprint") != plan.fingerprint:
        raise ValueError(
            f"{out}: an unfinished run of other shards (another dataset, per_shard, shuffle or seed) is "
            f"here ({PLAN}); finish it with the same arguments, or write to an empty folder"
        )

    shards, skipped = [], []
    steps = range(plan.count)
    if progress:
        from rich.progress import track

        steps = track(steps, description=f"writing {plan.count} shards", transient=True)
    for j in steps:
        good = []  # (key, pair, image file, member extension)
        for k in plan.positions(j):
            pair = dataset.pairs[int(plan.order[k])]
            try:
                good.append((f"{k:0{plan.width}d}", pair, *_check(dataset.root, pair)))
            except ValueError as e:
                skipped.append({"line": pair.line, "image": pair.image, "reason": str(e)})
        if not paths[j].is_file():  # atomic rename: a final name is a complete shard of this plan
            good = _write_shard(paths[j], good, skipped)
        shards.append({"name": paths[j].name, "samples": len(good)})

    _write_json(
        out / MANIFEST,
        {
            "format": FORMAT,
            "fingerprint": plan.fingerprint,
            "source": str(dataset.captions_file),
            "split": dataset.split,
            "per_shard": per_shard,
            "shuffle": shuffle,
            "seed": seed,
            "pairs": len(dataset),
            "samples": sum(s["samples"] for s in shards),
            "shards": shards,
            "skipped": skipped,
        },
    )
    (out / PLAN).unlink(missing_ok=True)
    if skipped:
        shown = "; ".join(f"line {s['line']}: {s['reason']}" for s in skipped[:5])
        warnings.warn(
            f"write_shards: skipped {len(skipped)} of {len(dataset)} pairs (listed in {out / MANIFEST}): {shown}",
            stacklevel=2,
        )
    return paths


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def read_manifest(folder: str | Path) -> dict | None:
    """The `shards.json` of a folder written by `write_shards`; None if the set is unfinished."""
    return _read_json(Path(folder) / MANIFEST)
