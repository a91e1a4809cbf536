"""A collection of a million synthetic 512-d vectors: build time, memory, search latency
(p50 / p99, one query at a time through Collection.search_vector, metadata included) and
recall@10 against exact search, for the index kinds asked for.

    nice -n 10 .venv/bin/python bench/index_scale.py                      # 1,000,000 x 512: auto + flat
    .venv/bin/python bench/index_scale.py --n 200000 --kinds auto         # auto = hnsw at this size

The vectors imitate image embeddings: n / 100 subjects (random unit centres), each image its
subject plus a variation in a shared 24-dimensional subspace plus a little isotropic noise,
L2-normalised (cosine to its subject about 0.7; intrinsic dimension well below 512, as with
real embeddings, where uniform random vectors would make every neighbour equally far).
Queries are new draws. Ground truth is brute force over all n. The collection is written the
way `polymodal index` writes it (SQLite batches of 10,000 with their vectors, then the FAISS
index). FAISS runs on --threads threads (default 1: on a shared machine, OpenMP threads
waiting on one another make single queries several times slower).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from polymodal.index.ann import choose_kind
from polymodal.index.collection import Collection
from polymodal.index.store import Store


def rss_gb() -> float:
    """Peak resident memory of this process so far (GB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def current_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def draws(rng, centres: np.ndarray, basis: np.ndarray, n: int) -> np.ndarray:
    d, r = basis.shape
    x = (centres[rng.integers(0, len(centres), n)]
         + rng.standard_normal((n, r), np.float32) @ basis.T * (0.9 / np.sqrt(r))
         + rng.standard_normal((n, d), np.float32) * (0.3 / np.sqrt(d)))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--kinds", default="auto,flat", help="comma-separated: auto, flat, hnsw, ivfpq")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="FAISS (OpenMP) threads")
    ap.add_argument("--dir", default=None, help="where to build the collection (default: a temporary folder)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the figures here")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    d = args.dim
    faiss.omp_set_num_threads(args.threads)
    centres = rng.standard_normal((max(10, args.n // 100), d), np.float32)  # 100 images a subject
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = np.linalg.qr(rng.standard_normal((d, 24)))[0].astype(np.float32)  # (d, 24) orthonormal
    root = Path(args.dir or tempfile.mkdtemp(prefix="index-scale-"))
    shutil.rmtree(root, ignore_errors=True)
    Store.initialise(root, {"model_id": "synthetic@0", "model_source": "", "dim": d, "generation": 0, "deletions": 0})
    coll = Collection(Store(root))

    t0 = time.perf_counter()
    chunk = 10_000
    for s in range(0, args.n, chunk):
        x = draws(rng, centres, basis, min(chunk, args.n - s))
        rows = [(f"/synthetic/{i:07d}.jpg", f"{i:064x}", 50_000, 0.0, 640, 480, "synthetic@0")
                for i in range(s, s + len(x))]
        coll.add_vectors(rows, x)
    ingest = time.perf_counter() - t0
    db_gb = sum(p.stat().st_size for p in root.glob("meta.sqlite*")) / 1e9
    print(f"{args.n:,} x {d} vectors into SQLite: {ingest:.1f} s ({args.n / ingest:,.0f} vectors/s), "
          f"{db_gb:.2f} GB on disk", flush=True)

    ids, x = coll.vectors()
    queries = draws(np.random.default_rng(1), centres, basis, args.queries)
    t0 = time.perf_counter()
    truth = np.concatenate([np.argsort(-(q @ x.T), axis=1)[:, :args.k] for q in np.array_split(queries, 20)])
    truth = ids[truth]
    exact_s = time.perf_counter() - t0
    print(f"ground truth (numpy brute force, {args.queries} queries): {exact_s:.1f} s", flush=True)
    del x

    results = {"n": args.n, "dim": d, "threads": args.threads, "ingest_s": round(ingest, 1), "sqlite_gb": round(db_gb, 2), "kinds": []}
    for name in args.kinds.split(","):
        kind = choose_kind(args.n) if name == "auto" else name
        for old in root.glob("vectors.*.faiss"):
            old.unlink()
        coll.index_kind, coll._ann = kind, None
        rss0 = current_rss_gb()
        t0 = time.perf_counter()
        ann = coll.ann  # reads the vectors back from SQLite, builds, saves atomically
        build = time.perf_counter() - t0
        index_gb = sum(p.stat().st_size for p in root.glob("vectors.*.faiss")) / 1e9
        rss1 = current_rss_gb()
        coll.search_vector(queries[0], args.k)  # warm
        lat, got = [], []
        for q in queries:
            t = time.perf_counter()
            hits = coll.search_vector(q, args.k)
            lat.append(time.perf_counter() - t)
            got.append([h.id for h in hits])
        recall = float(np.mean([len(set(g) & set(t.tolist())) / args.k for g, t in zip(got, truth, strict=True)]))
        lat_ms = np.array(lat) * 1e3
        row = {"kind": ann.kind, "asked": name, "build_s": round(build, 1), "index_file_gb": round(index_gb, 3),
               "rss_after_build_gb": round(rss1, 2), "rss_before_gb": round(rss0, 2), "peak_rss_gb": round(rss_gb(), 2),
               "p50_ms": round(float(np.percentile(lat_ms, 50)), 2), "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
               f"recall@{args.k}": round(recall, 4)}
        if ann.kind == "ivfpq":
            row.update(lists=int(ann.index.nlist), nprobe=int(ann.index.nprobe), pq_bytes=int(ann.index.pq.M))
        results["kinds"].append(row)
        print(json.dumps(row), flush=True)
        coll._ann = None
    print("\n| kind | build (s) | index file (GB) | search p50 (ms) | p99 (ms) | recall@10 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results["kinds"]:
        print(f"| {r['kind']}{' (auto)' if r['asked'] == 'auto' else ''} | {r['build_s']} | {r['index_file_gb']} | "
              f"{r['p50_ms']} | {r['p99_ms']} | {r[f'recall@{args.k}']} |")
    print(f"peak RSS {rss_gb():.2f} GB; SQLite ingest {ingest:.1f} s; collection at {root}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    coll.close()
    if args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
