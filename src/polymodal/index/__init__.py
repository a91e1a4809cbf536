"""Image collections: embeddings and metadata on disk, incremental and crash-safe, searchable.

Build (or bring up to date) a collection from a folder:

    from polymodal.index import build
    report = build("photos/", "photos.db", model=None,        # None: the collection's model,
                   report="bad.jsonl", progress=True)         #   or the embedded default when new
    report.added, report.removed, report.bad, report.images_per_s

Use it (the HTTP service does exactly this):

    from polymodal.index import Collection, Hit
    coll = Collection.open("photos.db")                 # model=None: the recorded model, loaded on first use
    coll.search_text("a puppy in the snow", k=10)       # -> list[Hit(id, path, score, width, height)]
    coll.search_image("q.png", k=10)                    # path, bytes or PIL image
    coll.search_vector(vec, k=10)                       # a (D,) L2-normalised vector
    coll.rank_texts("q.png", ["a cat", "a dog"])        # image -> text: [(text, cosine)], best first
    coll.get(3), coll.get("/abs/photos/a.png")          # Record(id, path, hash, size, mtime, width, height, model)
    coll.near_duplicates(3, threshold=0.95)             # -> list[Hit]
    coll.dedup(threshold=0.95)                          # -> list[list[Hit]], groups of near-duplicates
    coll.cluster(k=8, keywords=None)                    # -> list[Cluster(id, size, names, members, ...)]
    len(coll), coll.embedder, coll.dim, coll.model_id, coll.kind

Beyond one machine: each machine indexes its share (`build(..., shard=(i, n))`, or
`polymodal index DIR --db parts/part-{rank} --shard auto` under torchrun) and
`merge(["parts/part-0", ...], "photos.db")` joins the shards without embedding anything again.

A collection directory holds `meta.sqlite` (the source of truth: metadata and vectors, WAL
mode, committed in batches; store.py) and `vectors.*.faiss` (a derived FAISS index, flat /
HNSW / IVF-PQ by size, saved atomically and caught up from SQLite when behind; ann.py).
Opening with another model than the one that built it raises `ModelMismatch`.
"""

from polymodal.index.build import BuildReport, build
from polymodal.index.cluster import Cluster, draw_cluster_map
from polymodal.index.collection import Collection, Hit, ModelMismatch
from polymodal.index.merge import merge
from polymodal.index.store import Record

__all__ = ["BuildReport", "Cluster", "Collection", "Hit", "ModelMismatch", "Record", "build", "draw_cluster_map",
           "merge"]
