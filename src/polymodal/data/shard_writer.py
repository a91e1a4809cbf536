"""Writing WebDataset-style tar shards from a `PairDataset` (the layout: see shards.py).

Writing is atomic and resumable. Which sample lands in which shard is decided up front, from
(the pairs, `per_shard`, `shuffle`, `seed`) alone; its fingerprint goes to `.shards-plan.json`
before any shard. Each shard is written as `NNNNNN.tar.tmp`, flushed to disk and renamed, so a
final name only ever holds a complete shard. A rerun with the same plan keeps the shards that
exist and writes the others; `shards.json`, the manifest, is written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import stat
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polymodal.data.pairs import Pair, PairDataset
from polymodal.data.shards import FORMAT, IMAGE_EXTS, MANIFEST, PLAN, _is_shard, _read_json

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


