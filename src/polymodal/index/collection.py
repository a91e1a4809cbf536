"""`Collection`: one directory holding images' embeddings and metadata, searchable.

    coll = Collection.open("photos.db")            # the model recorded in it is loaded on first use
    coll.search_text("a puppy in the snow", k=10)  # [Hit(id, path, score, width, height), ...]
    coll.search_image("query.png", k=10)
    coll.search_vector(vec, k=10)
    coll.get(3) / coll.get("/abs/path.png")        # Record (metadata) or None
    coll.near_duplicates(3, threshold=0.95)        # [Hit, ...] other images at least that close
    coll.dedup(threshold=0.95)                     # [[Hit, ...], ...] groups of near-duplicates
    coll.cluster(k=8, keywords=[...])              # [Cluster(...)], see cluster.py

The collection refuses a model other than the one that built it (model id and dimension).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from polymodal.index.ann import ANN, KINDS, choose_kind, effective_kind
from polymodal.index.store import DB_NAME, Record, Store

DEFAULT_SOURCE = "default"  # the embedded default model
RESCORE = 100  # an ivfpq search re-scores at least this many candidates exactly (from SQLite)


@dataclass(frozen=True)
class Hit:
    id: int
    path: str
    score: float
    width: int
    height: int


class ModelMismatch(ValueError):
    """A collection opened or extended with another model than the one that built it."""


def model_fingerprint(embedder) -> str:
    """A short id of a model's weights: its name would not tell two fine-tunes apart, and
    hashing every weight of a large model takes seconds, so the config and a sample of each
    tensor (first and last 1,024 values) are hashed."""
    h = hashlib.sha256(json.dumps(asdict(embedder.model.cfg), sort_keys=True, default=str).encode())
    for name, t in sorted(embedder.model.state_dict().items()):
        flat = t.detach().reshape(-1).float().cpu()
        h.update(name.encode() + str(tuple(t.shape)).encode())
        h.update(flat[:1024].numpy().tobytes() + flat[-1024:].numpy().tobytes())
    return h.hexdigest()[:16]


def model_name(source: str | None) -> str:
    return DEFAULT_SOURCE if source is None else Path(str(source)).name or str(source) or "model"


def load_embedder(source: str | None):
    import polymodal

    return polymodal.load(None if source in (None, DEFAULT_SOURCE) else source)


class Collection:
    """See the module docstring. Thread-safe for searches (one lock around the index)."""

    def __init__(self, store: Store, embedder=None):
        self.store = store
        self.path = store.directory
        info = store.info()
        if "dim" not in info:
            raise ValueError(f"{self.path}: an empty collection (no model recorded); build it with "
                             "`polymodal index DIR --db COLLECTION`")
        self.dim = int(info["dim"])
        self.model_id = info["model_id"]
        self.model_source = info.get("model_source", DEFAULT_SOURCE)
        self.index_kind = info.get("index_kind") or None  # an override, or None for automatic
        self._embedder = None
        self._ann: ANN | None = None
        self.rescore = RESCORE
        self._lock = threading.RLock()
        if embedder is not None:
            self.check_model(embedder)
            self._embedder = embedder

    # --- opening --------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, model=None, *, readonly: bool = False) -> Collection:
        """Open a collection. `model` (a path, hub id or a loaded Embedder) must be the one that
        built it; None loads the recorded one on first need. readonly: never write (the index
        is then rebuilt in memory when the saved one is behind)."""
        store = Store(path, readonly=readonly)
        embedder = load_embedder(model) if isinstance(model, str | Path) else model
        return cls(store, embedder)

    @classmethod
    def create(cls, path: str | Path, embedder, *, source: str | None = None,
               index_kind: str | None = None) -> Collection:
        """Open a collection for writing, creating it for `embedder` if it does not exist."""
        if not (Path(path) / DB_NAME).is_file():
            Store.initialise(path, {"model_id": f"{model_name(source)}@{model_fingerprint(embedder)}",
                                    "model_source": DEFAULT_SOURCE if source is None else str(source),
                                    "dim": embedder.dim, "generation": 0, "deletions": 0})
        store = Store(path)
        if index_kind is not None:
            if index_kind != "auto" and index_kind not in KINDS:
                raise ValueError(f"--index-kind {index_kind!r}: known kinds are auto, {', '.join(KINDS)}")
            store.set_info(index_kind="" if index_kind == "auto" else index_kind)
        return cls(store, embedder)

    def check_model(self, embedder) -> None:
        fingerprint = model_fingerprint(embedder)
        if embedder.dim != self.dim or fingerprint != self.model_id.rsplit("@", 1)[-1]:
            raise ModelMismatch(
                f"{self.path}: this collection was built with model {self.model_id} ({self.dim}-d); "
                f"the model given is {fingerprint} ({embedder.dim}-d). Use the collection's model "
                f"({self.model_source}) or another --db")

    @property
    def embedder(self):
        """The collection's model (loaded on first use from the recorded source)."""
        if self._embedder is None:
            if not self.model_source:
                raise ValueError(f"{self.path}: this collection was built with a model object, not a path; "
                                 "open it with Collection.open(path, model=...)")
            embedder = load_embedder(self.model_source)
            self.check_model(embedder)
            self._embedder = embedder
        return self._embedder

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return len(self.store)

    # --- the index ------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self.ann.kind

    def _wanted_kind(self, n: int) -> str:
        return effective_kind(self.index_kind or choose_kind(n), n)

    @property
    def ann(self) -> ANN:
        """The FAISS index, brought up to date with the store (extended or rebuilt) if needed."""
        with self._lock:
            gen, dels = self.store.counters()
            ann = self._ann
            if ann is not None and ann.generation == gen:
                return ann
            if ann is None:
                ann = ANN.load_latest(self.path, self.dim)
            n = len(self.store)
            kind = self._wanted_kind(n)
            if ann is not None and (ann.deletions != dels or ann.kind != kind or ann.generation > gen):
                ann = None
            if ann is None and kind == "ivfpq":  # streamed from SQLite: only a sample in memory
                train = self.store.sample_vectors(self.dim, ANN.training_size(n))
                ann = ANN.build_ivfpq(n, train, self.store.iter_vectors(self.dim))
            elif ann is None:
                ids, vectors = self.store.vectors(self.dim)
                ann = ANN.build(kind, ids, vectors) if len(ids) else ANN.empty("flat", self.dim)
            else:
                for ids, vectors in self.store.iter_vectors(self.dim, after_id=ann.max_id):
                    ann.add(ids, vectors)
            ann.generation, ann.deletions = gen, dels  # ann.max_id: the last id it holds (add())
            if not self.store.readonly:
                with contextlib.suppress(OSError):  # a read-only directory: the index stays in memory
                    ann.save(self.path)
            self._ann = ann
            return ann

    def add_vectors(self, rows: list[tuple], vectors: np.ndarray) -> None:
        """Store rows (path, hash, size, mtime, width, height, model) with their vectors, one
        transaction; the index catches up on the next search or `sync()`."""
        self.store.add(rows, vectors)

    def sync(self) -> ANN:
        """Bring the saved index up to date now (the indexer calls this at the end)."""
        return self.ann

    # --- search ---------------------------------------------------------------------------------

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
        keep = [(int(i), float(s)) for i, s in zip(ids, scores, strict=True) if i >= 0]
        records = self.store.records([i for i, _ in keep])
        return [Hit(i, r.path, s, r.width, r.height) for i, s in keep if (r := records.get(i))]

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """One list of hits per query row, best first."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        if queries.shape[1] != self.dim:
            raise ValueError(f"a {queries.shape[1]}-d query against a {self.dim}-d collection")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        with self._lock:
            ann = self.ann
            if len(ann) == 0:
                return [[] for _ in queries]
            if ann.kind != "ivfpq":
                scores, ids = ann.search(queries, k)
                return [self._hits(s, i) for s, i in zip(scores, ids, strict=True)]
            # Compressed codes rank approximately: fetch more candidates, re-score them exactly.
            _, cand = ann.search(queries, max(10 * k, self.rescore))
        out = []
        for q, row in zip(queries, cand, strict=True):
            row = row[row >= 0]
            exact = self._exact_scores(q, row)
            best = np.argsort(-exact, kind="stable")[:k]
            out.append(self._hits(exact[best], row[best]))
        return out

    def _exact_scores(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        if len(ids) == 0:
            return np.zeros(0, np.float32)
        marks = ",".join("?" * len(ids))
        rows = dict(self.store.db.execute(f"SELECT id, vector FROM images WHERE id IN ({marks})",
                                          [int(i) for i in ids]))
        vecs = np.stack([np.frombuffer(rows[int(i)], np.float32) if int(i) in rows
                         else np.full(self.dim, -np.inf, np.float32) for i in ids])
        return vecs @ q

    def search_vector(self, vector: np.ndarray, k: int = 10) -> list[Hit]:
        return self.search_vectors(np.asarray(vector, np.float32).reshape(1, -1), k)[0]

    def search_text(self, query: str, k: int = 10) -> list[Hit]:
        return self.search_vector(self.embedder.encode_text([query])[0], k)

    def search_image(self, image, k: int = 10) -> list[Hit]:
        """`image`: a path, bytes or a PIL image (ImageError when it is not one)."""
        return self.search_vector(self.embedder.encode_image([image])[0], k)

    def rank_texts(self, image, texts: list[str]) -> list[tuple[str, float]]:
        """Image -> text: `texts` ordered by cosine similarity to the image, best first.
        `image` is an id or path in the collection, or an image (path, bytes, PIL)."""
        vec = self._vector_of(image)
        scores = self.embedder.encode_text(list(texts)) @ vec
        return sorted(zip(texts, map(float, scores), strict=True), key=lambda x: -x[1])

    def _vector_of(self, item) -> np.ndarray:
        """The stored vector of an id or stored path; otherwise `item` is embedded as an image."""
        record = self.get(item) if isinstance(item, int | str) else None
        if record is not None:
            return self.store.vector(record.id)
        if isinstance(item, int):
            raise ValueError(f"{self.path}: no image with id {item}")
        return self.embedder.encode_image([item])[0]

    # --- records --------------------------------------------------------------------------------

    def get(self, key: int | str) -> Record | None:
        """The record of an id or a path (as stored: absolute), or None."""
        if isinstance(key, str) and not key.isdigit():
            return self.store.record(str(Path(key).resolve())) or self.store.record(key)
        return self.store.record(int(key))

    def records(self) -> list[Record]:
        return self.store.all_records()

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the whole collection, in id order."""
        return self.store.vectors(self.dim)

    # --- near-duplicates ------------------------------------------------------------------------

    def near_duplicates(self, key: int | str, threshold: float = 0.95) -> list[Hit]:
        """Other images whose cosine similarity with `key` is at least `threshold`, best first."""
        record = self.get(key)
        if record is None:
            raise ValueError(f"{self.path}: no image {key!r}")
        vec = self.store.vector(record.id)
        k = 16
        while True:
            hits = self.search_vector(vec, k)
            if len(hits) < k or hits[-1].score < threshold:
                return [h for h in hits if h.score >= threshold and h.id != record.id]
            k *= 4

    def dedup(self, threshold: float = 0.95, *, k: int = 16) -> list[list[Hit]]:
        """Groups (two or more) of near-duplicates: images joined when their cosine similarity
        is at least `threshold` (single linkage over each image's k nearest neighbours,
        widened for an image with more than k). Largest groups first; within a group, the
        first-indexed image first, each with its similarity to that one."""
        ids, vectors = self.vectors()
        if len(ids) < 2:
            return []
        parent = {int(i): int(i) for i in ids}

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        kk = min(k, len(ids))
        for start in range(0, len(ids), 4096):
            batch = vectors[start:start + 4096]
            hits = self.search_vectors(batch, kk)
            for j, row in enumerate(hits):
                if len(row) == kk and row[-1].score >= threshold and kk < len(ids):
                    row = self.near_duplicates(int(ids[start + j]), threshold)
                a = find(int(ids[start + j]))
                for h in row:
                    if h.score >= threshold and h.id != ids[start + j]:
                        b = find(h.id)
                        if a != b:
                            parent[max(a, b)] = min(a, b)
                            a = min(a, b)
        groups: dict[int, list[int]] = {}
        for i in parent:
            groups.setdefault(find(i), []).append(i)
        index = {int(i): n for n, i in enumerate(ids)}
        out = []
        for members in groups.values():
            if len(members) < 2:
                continue
            members.sort()
            head = vectors[index[members[0]]]
            recs = self.store.records(members)
            out.append([Hit(m, recs[m].path, float(vectors[index[m]] @ head), recs[m].width, recs[m].height)
                        for m in members])
        return sorted(out, key=lambda g: (-len(g), g[0].id))

    # --- clusters -------------------------------------------------------------------------------

    def cluster(self, k: int = 8, keywords: list[str] | None = None, *, seed: int = 0,
                template: str = "a photo of a {}."):
        """k-means over the embeddings; each cluster named by its nearest keywords (see cluster.py)."""
        from polymodal.index.cluster import cluster_collection

        return cluster_collection(self, k, keywords, seed=seed, template=template)
