"""The FAISS index over a collection's vectors: which kind, how it is built, saved and loaded.

Vectors are L2-normalised, so inner product is cosine similarity. Three kinds, chosen from
the number of vectors unless overridden (`--index-kind`):

  flat   exact search                          n <  FLAT_MAX (50,000)
  hnsw   HNSW graph, 32 links, vectors kept     n <  HNSW_MAX (500,000)
  ivfpq  inverted lists + product quantisation  above: sqrt(n) lists, d/8 bytes a vector;
         candidates are re-scored exactly from the vectors in SQLite (Collection.search_vector)

The index is a cache: SQLite holds every vector. It is saved as one file whose name carries
the store counters it reflects, `vectors.g{generation}.d{deletions}.m{max_id}.{kind}.faiss`,
written to a temporary name and moved into place (os.replace), so a killed process leaves
either the old file or the new one, never half of one. An index behind the store is extended
with the rows added since (ids only grow); after a deletion it is rebuilt.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FLAT_MAX = 50_000
HNSW_MAX = 500_000
IVFPQ_MIN = 10_000
NPROBE = 64  # bench/index_scale.py at 1M: 32 probes recall@10 0.86, 64 probes 0.90 (p50 3.5 -> 6.7 ms)
KINDS = ("flat", "hnsw", "ivfpq")
_NAME = re.compile(r"^vectors\.g(\d+)\.d(\d+)\.m(\d+)\.(flat|hnsw|ivfpq)\.faiss$")


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a dependency
        raise ImportError("the index needs faiss: pip install faiss-cpu") from e
    return faiss


def choose_kind(n: int) -> str:
    """The automatic choice for n vectors."""
    return "flat" if n < FLAT_MAX else "hnsw" if n < HNSW_MAX else "ivfpq"


def effective_kind(kind: str, n: int) -> str:
    """An ivfpq index needs enough vectors to train its quantisers; below IVFPQ_MIN it is flat."""
    return "flat" if kind == "ivfpq" and n < IVFPQ_MIN else kind


def ivf_lists(n: int) -> int:
    """About sqrt(n) inverted lists, a power of two: 1,024 for a million vectors. FAISS's usual
    4 sqrt(n) needs four times the training points and k-means time; with 32 probes and the
    candidates re-scored exactly, fewer, larger lists cost little recall (bench/index_scale.py)."""
    return int(min(65536, max(1, 2 ** round(math.log2(max(1.0, math.sqrt(n)))))))


def pq_bytes(dim: int) -> int:
    """Sub-quantisers (bytes a vector): d/8, but at least 8 for small d (the largest divisor
    of dim at most that)."""
    return next(m for m in range(max(dim // 8, min(dim, 8)), 0, -1) if dim % m == 0)


@dataclass
class ANN:
    kind: str
    index: object  # a faiss index searching by inner product, labels = SQLite ids
    dim: int
    generation: int = 0
    deletions: int = 0
    max_id: int = 0
    nprobe: int = NPROBE  # ivfpq: inverted lists visited a query (more: better recall, slower)

    @property
    def exact(self) -> bool:
        return self.kind == "flat"

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def empty(cls, kind: str, dim: int, train: np.ndarray | None = None, *, n_lists: int | None = None,
              hnsw_m: int = 32, ef_construction: int = 80) -> ANN:
        """A new index of `kind`; ivfpq is trained on `train` (a sample of the vectors) with
        `n_lists` inverted lists (default: for as many vectors as `train` holds)."""
        faiss = _faiss()
        ip = faiss.METRIC_INNER_PRODUCT
        if kind == "flat":
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        elif kind == "hnsw":
            base = faiss.IndexHNSWFlat(dim, hnsw_m, ip)
            base.hnsw.efConstruction = ef_construction
            index = faiss.IndexIDMap2(base)
        elif kind == "ivfpq":
            if train is None or len(train) == 0:
                raise ValueError("an ivfpq index needs vectors to train on")
            n_lists = max(1, min(n_lists or ivf_lists(len(train)), len(train) // 39))
            index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, n_lists, pq_bytes(dim), 8, ip)
            index.cp.min_points_per_centroid = 5  # quiet on small training sets
            index.pq.cp.max_points_per_centroid = 64  # 16,384 points train each sub-quantiser (not 65,536)
            index.train(np.ascontiguousarray(train, np.float32))
            index.nprobe = min(n_lists, NPROBE)
        else:
            raise ValueError(f"unknown index kind {kind!r}; known: {', '.join(KINDS)}")
        return cls(kind, index, dim)

    @classmethod
    def build(cls, kind: str, ids: np.ndarray, vectors: np.ndarray, *, seed: int = 0) -> ANN:
        dim = vectors.shape[1]
        train = None
        if kind == "ivfpq":
            n_train = cls.training_size(len(vectors))
            pick = np.random.default_rng(seed).choice(len(vectors), n_train, replace=False)
            train = vectors[np.sort(pick)]
        ann = cls.empty(kind, dim, train, n_lists=ivf_lists(len(vectors)))
        ann.add(ids, vectors)
        return ann

    @classmethod
    def build_ivfpq(cls, n: int, train: np.ndarray, chunks) -> ANN:
        """An ivfpq index for n vectors, trained on a sample and filled chunk by chunk from
        (ids, vectors) pairs, so the vectors never need to be in memory all at once."""
        ann = cls.empty("ivfpq", train.shape[1], train, n_lists=ivf_lists(n))
        for ids, vectors in chunks:
            ann.add(ids, vectors)
        return ann

    @staticmethod
    def training_size(n: int) -> int:
        return min(n, max(20_000, 64 * ivf_lists(n)))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64))
            self.max_id = max(self.max_id, int(ids.max()))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (Q, k), best first; missing neighbours have id -1."""
        k = max(1, min(k, len(self))) if len(self) else 1
        if self.kind == "hnsw":
            _faiss().downcast_index(self.index.index).hnsw.efSearch = max(64, 2 * k)
        elif self.kind == "ivfpq":
            self.index.nprobe = min(self.index.nlist, self.nprobe)
        return self.index.search(np.ascontiguousarray(queries, np.float32), k)

    # --- files ----------------------------------------------------------------------------------

    def filename(self) -> str:
        return f"vectors.g{self.generation}.d{self.deletions}.m{self.max_id}.{self.kind}.faiss"

    def save(self, directory: str | Path) -> Path:
        """Atomically write the index; older index files are removed after."""
        faiss = _faiss()
        directory = Path(directory)
        final = directory / self.filename()
        tmp = directory / f".{final.name}.{os.getpid()}.tmp"
        faiss.write_index(self.index, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        for old in directory.glob("vectors.*.faiss"):
            if old.name != final.name:
                old.unlink(missing_ok=True)
        return final

    @classmethod
    def load_latest(cls, directory: str | Path, dim: int) -> ANN | None:
        """The newest saved index of a collection directory, or None."""
        best = None
        for p in Path(directory).glob("vectors.*.faiss"):
            m = _NAME.match(p.name)
            if m and (best is None or int(m.group(1)) > best[0][0]):
                best = ((int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)), p)
        if best is None:
            return None
        (gen, dels, max_id, kind), path = best
        try:
            index = _faiss().read_index(str(path))
        except RuntimeError:  # a file removed or replaced while we read it: rebuild
            return None
        if index.d != dim:
            return None
        return cls(kind, index, dim, gen, dels, max_id)
