"""The collection's source of truth: one SQLite file in WAL mode holding every image's metadata
and its embedding (float32 blob), committed in batches.

A process killed at any moment leaves the last committed batch intact (WAL with
synchronous=NORMAL survives a killed process; only a power cut can lose the last batches,
never corrupt the file). The FAISS index beside it (ann.py) is a cache derived from these rows.

Tables:
  info(key, value)      model_id, model_source, dim, generation (bumped by every change),
                        deletions (bumped when a row is removed, which an index cannot follow
                        incrementally), index_kind (an override of the automatic choice)
  images(id, path, hash, size, mtime, width, height, model, vector)
                        ids only grow: a changed file gets a new row and its old row goes
  bad(path, size, mtime, error)
                        files that could not be read, so an unchanged bad file is reported
                        again without being read again
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    model TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS images_hash ON images (hash);
CREATE TABLE IF NOT EXISTS bad (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime REAL NOT NULL, error TEXT NOT NULL
);
"""

DB_NAME = "meta.sqlite"


@dataclass(frozen=True)
class Record:
    """One image of a collection (its vector apart)."""

    id: int
    path: str
    hash: str
    size: int
    mtime: float
    width: int
    height: int
    model: str


_COLUMNS = "id, path, hash, size, mtime, width, height, model"


class Store:
    """SQLite access for one existing collection directory (see `initialise`). `readonly=True`
    never writes. Each thread gets its own connection (a server searches from many threads;
    WAL lets them read while one writer commits)."""

    def __init__(self, directory: str | Path, *, readonly: bool = False):
        self.directory = Path(directory)
        self._path = self.directory / DB_NAME
        if not self._path.is_file():
            raise ValueError(f"{self.directory}: not a polymodal collection (no {DB_NAME}); "
                             "build one with `polymodal index DIR --db COLLECTION`")
        self.readonly = readonly
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        self.db.execute("SELECT COUNT(*) FROM info")  # fail here, not at the first search

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection."""
        con = getattr(self._local, "con", None)
        if con is None:
            uri = f"file:{self._path}?mode=ro" if self.readonly else f"file:{self._path}"
            con = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None, check_same_thread=False)
            if not self.readonly:
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("PRAGMA synchronous=NORMAL")
                con.executescript(SCHEMA)
            self._local.con = con
            with self._guard:
                self._connections.append(con)
        return con

    @staticmethod
    def initialise(directory: str | Path, info: dict) -> None:
        """Create the collection's SQLite file with its info in place, atomically: written under
        a temporary name, closed (so the WAL is folded in) and moved to its name. A process
        killed meanwhile leaves no half-made collection."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{DB_NAME}.{os.getpid()}.tmp"
        for leftover in directory.glob(f".{DB_NAME}.*.tmp*"):
            leftover.unlink(missing_ok=True)
        db = sqlite3.connect(tmp, isolation_level=None)
        # 16 KiB pages hold seven 512-d rows (2 KiB vector + metadata); 4 KiB pages hold one,
        # which would double the file.
        db.execute("PRAGMA page_size=16384")
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        db.execute("BEGIN")
        db.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)", [(k, str(v)) for k, v in info.items()])
        db.execute("COMMIT")
        db.close()
        os.replace(tmp, directory / DB_NAME)

    def close(self) -> None:
        with self._guard:
            for con in self._connections:
                con.close()
            self._connections.clear()
        self._local = threading.local()

    # --- info -----------------------------------------------------------------------------------

    def info(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM info"))

    def set_info(self, **values) -> None:
        with self.transaction():
            self.db.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)",
                                [(k, str(v)) for k, v in values.items()])

    def counters(self) -> tuple[int, int]:
        """(generation, deletions): what an index cache compares itself with."""
        info = self.info()
        return int(info.get("generation", 0)), int(info.get("deletions", 0))

    def _bump(self, deleted: bool) -> None:
        gen, dels = self.counters()
        rows = [("generation", str(gen + 1))] + ([("deletions", str(dels + 1))] if deleted else [])
        self.db.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)", rows)

    def transaction(self):
        return _Transaction(self.db)

    # --- reads ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def known(self) -> dict[str, tuple[int, float, str]]:
        """path -> (size, mtime, hash) of every stored image."""
        return {p: (s, m, h) for p, s, m, h in self.db.execute("SELECT path, size, mtime, hash FROM images")}

    def known_bad(self) -> dict[str, tuple[int, float, str]]:
        return {p: (s, m, e) for p, s, m, e in self.db.execute("SELECT path, size, mtime, error FROM bad")}

    def records(self, ids: Iterable[int]) -> dict[int, Record]:
        ids = [int(i) for i in ids]
        out = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            q = f"SELECT {_COLUMNS} FROM images WHERE id IN ({','.join('?' * len(chunk))})"
            out.update({r[0]: Record(*r) for r in self.db.execute(q, chunk)})
        return out

    def record(self, key: int | str) -> Record | None:
        column = "id" if isinstance(key, int) else "path"
        row = self.db.execute(f"SELECT {_COLUMNS} FROM images WHERE {column} = ?", (key,)).fetchone()
        return Record(*row) if row else None

    def all_records(self) -> list[Record]:
        return [Record(*r) for r in self.db.execute(f"SELECT {_COLUMNS} FROM images ORDER BY id")]

    def vector(self, key: int) -> np.ndarray | None:
        row = self.db.execute("SELECT vector FROM images WHERE id = ?", (key,)).fetchone()
        return np.frombuffer(row[0], np.float32).copy() if row else None

    def vector_by_hash(self, digest: str) -> np.ndarray | None:
        row = self.db.execute("SELECT vector FROM images WHERE hash = ? LIMIT 1", (digest,)).fetchone()
        return np.frombuffer(row[0], np.float32).copy() if row else None

    def iter_vectors(self, dim: int, *, after_id: int = 0, chunk: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64, vectors float32 (n, dim)) in id order, for rows with id > after_id."""
        last = after_id
        while True:
            rows = self.db.execute("SELECT id, vector FROM images WHERE id > ? ORDER BY id LIMIT ?",
                                   (last, chunk)).fetchall()
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), dim)
            yield ids, vecs
            last = int(ids[-1])

    def vectors(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self.iter_vectors(dim))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def sample_vectors(self, dim: int, n: int, seed: int = 0) -> np.ndarray:
        """n vectors drawn at random without replacement (all of them when n >= len)."""
        ids = np.fromiter((r[0] for r in self.db.execute("SELECT id FROM images")), np.int64)
        pick = np.sort(np.random.default_rng(seed).choice(ids, min(n, len(ids)), replace=False))
        out = []
        for s in range(0, len(pick), 500):
            chunk = [int(i) for i in pick[s:s + 500]]
            rows = self.db.execute(f"SELECT vector FROM images WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            out.extend(np.frombuffer(r[0], np.float32) for r in rows)
        return np.stack(out) if out else np.zeros((0, dim), np.float32)

    def iter_rows(self, *, chunk: int = 10_000) -> Iterator[tuple[list[tuple], list[bytes]]]:
        """Every image as (path, hash, size, mtime, width, height, model) rows and vector blobs,
        in id order, a chunk at a time."""
        last = 0
        while True:
            rows = self.db.execute("SELECT id, path, hash, size, mtime, width, height, model, vector FROM images "
                                   "WHERE id > ? ORDER BY id LIMIT ?", (last, chunk)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [r[1:8] for r in rows], [r[8] for r in rows]

    def max_id(self) -> int:
        return self.db.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0]

    # --- writes (each one transaction) ----------------------------------------------------------

    def add(self, rows: list[tuple], vectors: np.ndarray) -> None:
        """rows: (path, hash, size, mtime, width, height, model); a row whose path is already
        stored replaces it (new id, old row removed). One transaction, one generation."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        with self.transaction():
            replaced = self.db.executemany(
                "DELETE FROM images WHERE path = ?", [(r[0],) for r in rows]).rowcount
            self.db.executemany("DELETE FROM bad WHERE path = ?", [(r[0],) for r in rows])
            self.db.executemany(
                "INSERT INTO images (path, hash, size, mtime, width, height, model, vector) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(*r, v.tobytes()) for r, v in zip(rows, vectors, strict=True)])
            self._bump(deleted=replaced > 0)

    def touch(self, rows: list[tuple[str, int, float]]) -> None:
        """(path, size, mtime) of files whose content did not change: metadata only."""
        with self.transaction():
            self.db.executemany("UPDATE images SET size = ?, mtime = ? WHERE path = ?",
                                [(s, m, p) for p, s, m in rows])

    def mark_bad(self, rows: list[tuple[str, int, float, str]]) -> None:
        """(path, size, mtime, error): also drops a stored row of that path (the file went bad)."""
        with self.transaction():
            removed = self.db.executemany("DELETE FROM images WHERE path = ?", [(r[0],) for r in rows]).rowcount
            self.db.executemany("INSERT OR REPLACE INTO bad VALUES (?, ?, ?, ?)", rows)
            if removed > 0:
                self._bump(deleted=True)

    def remove(self, paths: Iterable[str]) -> int:
        """Forget files that are gone (images and bad). Returns how many images were removed."""
        paths = [(p,) for p in paths]
        if not paths:
            return 0
        with self.transaction():
            removed = self.db.executemany("DELETE FROM images WHERE path = ?", paths).rowcount
            self.db.executemany("DELETE FROM bad WHERE path = ?", paths)
            if removed > 0:
                self._bump(deleted=True)
        return removed


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, tb):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False
