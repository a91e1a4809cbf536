"""Merging shard collections into one: how a collection beyond one machine is put together.

Each machine (or each torchrun rank) indexes its share of the folder into its own collection
(`polymodal index DIR --db shards/part-{rank} --shard auto`); `merge` then copies every shard's
rows, vectors included, into one collection (no image is read or embedded again) and builds
its FAISS index once, streamed from SQLite for IVF-PQ. Shards must share the model.

Crash-safe like indexing: each chunk is one transaction, and a rerun skips the rows already
copied (same path and content hash).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from polymodal.index.collection import Collection
from polymodal.index.store import DB_NAME, Store


def merge(shards: list[str | Path], db: str | Path, *, index_kind: str | None = None) -> dict:
    """Copy the images of `shards` (collection directories) into `db` (created if missing);
    returns {"copied", "skipped", "total", "index_kind"}."""
    if not shards:
        raise ValueError("merge: no shard collections given")
    sources = [Collection.open(s, readonly=True) for s in shards]
    first = sources[0]
    if not (Path(db) / DB_NAME).is_file():
        Store.initialise(db, {"model_id": first.model_id, "model_source": first.model_source, "dim": first.dim,
                              "generation": 0, "deletions": 0})
    dest = Collection(Store(db))
    if index_kind is not None:
        dest.store.set_info(index_kind="" if index_kind == "auto" else index_kind)
        dest.index_kind = index_kind if index_kind != "auto" else None
    copied = skipped = 0
    for shard, src in zip(shards, sources, strict=True):
        if (src.model_id, src.dim) != (dest.model_id, dest.dim):
            raise ValueError(f"{shard}: built with model {src.model_id} ({src.dim}-d), but {db} holds "
                             f"{dest.model_id} ({dest.dim}-d); shards must share one model")
        known = dest.store.known()
        for rows, blobs in src.store.iter_rows():
            keep = [i for i, r in enumerate(rows) if known.get(r[0], (None, None, None))[2] != r[1]]
            skipped += len(rows) - len(keep)
            if keep:
                vectors = np.frombuffer(b"".join(blobs[i] for i in keep), np.float32).reshape(len(keep), dest.dim)
                dest.store.add([rows[i] for i in keep], vectors)
                copied += len(keep)
        bad = src.store.known_bad()
        if bad:
            dest.store.mark_bad([(p, s, m, e) for p, (s, m, e) in bad.items() if p not in known])
        src.close()
    kind = dest.sync().kind
    out = {"copied": copied, "skipped": skipped, "total": len(dest), "index_kind": kind}
    dest.close()
    return out
