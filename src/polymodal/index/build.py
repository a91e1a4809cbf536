"""Indexing a folder into a collection: walk, decode in worker processes, embed, commit.

    report = build("photos/", "photos.db", model=None, report="bad.jsonl", progress=True)

1. Walk DIR for image files (by extension) and stat them. A file whose path, size and mtime
   are stored is done; a stored path that is gone from DIR is removed.
2. Worker processes read each remaining file, hash its content (sha256), decode and
   preprocess it (processing/image.py), and send back the model's input tensor. A bounded
   window of tasks is kept in flight, so the encoder always has a batch waiting and memory
   stays flat however large the folder.
3. A file whose content hash is already stored (touched, copied, moved) takes the stored
   vector; the others are embedded a batch at a time.
4. Each batch is committed to SQLite in one transaction (vectors and metadata together).
   A process killed at any point loses at most the batch in flight; a rerun starts after
   the last commit. The FAISS index is brought up to date at the end (and by any reader).

Bad files are skipped, remembered (an unchanged bad file is not read again) and listed in
the report (one JSON object a line: path, error).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polymodal.index.collection import Collection, load_embedder

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class BuildReport:
    files: int = 0          # image files found
    added: int = 0          # embedded (new or changed content)
    reused: int = 0         # stored vector reused (same content under another path or mtime)
    unchanged: int = 0      # path, size and mtime as stored: not read
    removed: int = 0        # stored, but gone from the folder
    bad: list[dict] = field(default_factory=list)  # {path, error}
    seconds: float = 0.0
    total: int = 0          # images in the collection after the run
    index_kind: str = ""

    @property
    def images_per_s(self) -> float:
        return (self.added + self.reused) / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {"files": self.files, "added": self.added, "reused": self.reused, "unchanged": self.unchanged,
                "removed": self.removed, "bad": self.bad, "seconds": round(self.seconds, 3),
                "images_per_s": round(self.images_per_s, 2), "total": self.total,
                "index_kind": self.index_kind}


def walk(root: Path, shard: tuple[int, int] | None = None) -> Iterator[Path]:
    """Image files under root, sorted (symlinked folders are not followed). With shard=(i, n),
    only the files whose path hashes to i mod n: the part one of n machines indexes."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in sorted(filenames):
            if Path(name).suffix.lower() in EXTENSIONS and not name.startswith("."):
                p = Path(dirpath) / name
                if shard is not None:
                    i, n = shard
                    h = int.from_bytes(hashlib.blake2b(str(p.relative_to(root)).encode(), digest_size=8).digest())
                    if h % n != i:
                        continue
                yield p


# --- the worker side ----------------------------------------------------------------------------

_CFG = None


def _init_worker(cfg) -> None:
    global _CFG
    _CFG = cfg
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if sys.platform == "linux":  # die with the parent, even when it is killed with SIGKILL
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def decode(path: str, cfg=None) -> dict:
    """Read, hash, decode and preprocess one file: {path, hash, width, height, pixels} or
    {path, error}. Runs in a worker process."""
    from polymodal.processing.image import ImageError, load_image, transform

    cfg = cfg or _CFG
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return {"path": path, "error": f"{path}: cannot read ({e.strerror})"}
    out = {"path": path, "hash": hashlib.sha256(data).hexdigest()}
    try:
        image = load_image(path)
        out.update(width=image.width, height=image.height, pixels=transform(image, cfg).numpy())
    except ImageError as e:
        out["error"] = str(e)
    except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not stop the batch
        out["error"] = f"{path}: cannot decode ({type(e).__name__}: {' '.join(str(e).split())})"
    return out


def decoded(paths: list[str], cfg, workers: int, window: int) -> Iterator[dict]:
    """`decode` over paths in order, in `workers` processes with at most `window` in flight."""
    if workers <= 0:
        yield from (decode(p, cfg) for p in paths)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(cfg,)) as pool:
        pending: deque = deque()
        for p in paths:
            pending.append(pool.apply_async(decode, (p,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# --- the parent side ----------------------------------------------------------------------------


def _progress_bar(enabled: bool, total: int):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class Rate(TextColumn):
        def render(self, task):
            from rich.text import Text

            return Text(f"{task.speed or 0:.1f} images/s")

    bar = Progress(TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), Rate(""),
                   TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                   disable=not enabled, transient=False)
    return bar, bar.add_task("indexing", total=total)


def build(directory: str | Path, db: str | Path, model=None, *, report: str | Path | None = None,
          progress: bool = True, workers: int | None = None, batch_size: int = 32,
          index_kind: str | None = None, shard: tuple[int, int] | None = None,
          on_bad: Callable[[str], None] | None = None) -> BuildReport:
    """Index the images under `directory` into the collection `db` (created if missing).

    model: a checkpoint path / hub id, a loaded Embedder, or None for the collection's
    recorded model (the embedded default for a new collection). workers: decoding
    processes (default: CPU count - 1, at least 1; 0 decodes in this process).
    index_kind: auto / flat / hnsw / ivfpq (stored in the collection). report: a .jsonl
    file listing the bad files. on_bad: called with each bad file's one-line message."""
    t0 = time.perf_counter()
    root = Path(directory).resolve()
    if not root.is_dir():
        raise ValueError(f"{directory}: not a folder")
    out = BuildReport()
    paths = sorted(walk(root, shard))
    out.files = len(paths)
    stats = {}
    for p in paths:
        try:
            st = p.stat()
            stats[str(p)] = (st.st_size, st.st_mtime)
        except OSError as e:
            out.bad.append({"path": str(p), "error": f"{p}: cannot read ({e.strerror})"})

    workers = max(1, (os.cpu_count() or 2) - 1) if workers is None else workers
    coll = _open_for_writing(db, model, index_kind)
    store, embedder = coll.store, coll.embedder

    known, known_bad = store.known(), store.known_bad()
    prefix = str(root) + os.sep
    gone = [p for p in list(known) + list(known_bad) if p.startswith(prefix) and p not in stats]
    if shard is not None:  # the other shards' files are not ours to remove
        gone = [p for p in gone if not Path(p).exists()]
    out.removed = store.remove(gone)

    todo = []
    for p, (size, mtime) in stats.items():
        if p in known and known[p][:2] == (size, mtime):
            out.unchanged += 1
        elif p in known_bad and known_bad[p][:2] == (size, mtime):
            out.bad.append({"path": p, "error": known_bad[p][2]})
        else:
            todo.append(p)

    bar, task = _progress_bar(progress, len(todo))
    window = max(2 * batch_size, 8 * workers)
    pending: list[dict] = []             # to embed in the next batch
    copies: dict[str, list[dict]] = {}   # hash -> files whose content is already pending

    def flush() -> None:
        if not pending:
            return
        vectors = embedder._image_vectors(_stack([d["pixels"] for d in pending]))
        rows = [_row(d, stats, coll.model_id) for d in pending]
        for d, v in zip(list(pending), vectors, strict=True):
            for copy in copies.pop(d["hash"], []):
                rows.append(_row(copy, stats, coll.model_id))
                vectors = np.concatenate([vectors, v[None]])
                out.reused += 1
        store.add(rows, vectors)
        out.added += len(pending)
        bar.advance(task, len(rows))
        pending.clear()

    with bar:
        reused_rows, reused_vecs, touched = [], [], []
        for d in decoded(todo, embedder.transform, workers, window):
            p = d["path"]
            if "error" in d:
                out.bad.append({"path": p, "error": d["error"]})
                store.mark_bad([(p, *stats[p], d["error"])])
                if on_bad:
                    on_bad(d["error"])
                bar.advance(task)
                continue
            if p in known and known[p][2] == d["hash"]:
                touched.append((p, *stats[p]))
            elif (vec := store.vector_by_hash(d["hash"])) is not None:
                reused_rows.append(_row(d, stats, coll.model_id))
                reused_vecs.append(vec)
            elif any(q["hash"] == d["hash"] for q in pending):
                copies.setdefault(d["hash"], []).append(d)
                continue
            else:
                pending.append(d)
                if len(pending) >= batch_size:
                    flush()
                continue
            if len(touched) + len(reused_rows) >= batch_size:
                _commit_reused(store, touched, reused_rows, reused_vecs, out)
            bar.advance(task)
        flush()
        _commit_reused(store, touched, reused_rows, reused_vecs, out)

    out.total = len(store)
    out.index_kind = coll.sync().kind
    out.seconds = time.perf_counter() - t0
    if report is not None:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text("".join(json.dumps(b) + "\n" for b in out.bad))
    coll.close()
    return out


def _open_for_writing(db, model, index_kind) -> Collection:
    """The collection at `db` (created if missing) with its embedder, refusing another model."""
    embedder = None if model is None or isinstance(model, str | Path) else model
    source = None if embedder is not None or model is None else str(model)
    if source is not None and Path(source).exists():
        source = str(Path(source).resolve())
    if Path(db, "meta.sqlite").is_file():
        with Collection.open(db) as old:
            if embedder is None:
                embedder = load_embedder(source if source is not None else old.model_source)
            old.check_model(embedder)
    elif embedder is None:
        embedder = load_embedder(source)
    else:
        source = ""  # a model object: nothing to reload it from, the caller passes it again
    return Collection.create(db, embedder, source=source, index_kind=index_kind)


def _stack(arrays: Iterable[np.ndarray]):
    import torch

    return torch.from_numpy(np.stack(list(arrays)))  # (B, 3, H, W)


def _row(d: dict, stats: dict, model_id: str) -> tuple:
    size, mtime = stats[d["path"]]
    return (d["path"], d["hash"], size, mtime, d["width"], d["height"], model_id)


def _commit_reused(store, touched: list, rows: list, vecs: list, out: BuildReport) -> None:
    if touched:
        store.touch(touched)
        out.unchanged += len(touched)
    if rows:
        store.add(rows, np.stack(vecs))
        out.reused += len(rows)
    touched.clear(), rows.clear(), vecs.clear()
