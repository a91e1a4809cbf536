"""A collection of a million synthetic 512-d vectors: build time, memory, search latency
(p50 / p99, one query at a time through Collection.search_vector, metadata included) and
recall@10 against exact search, for the index kinds asked for.

    nice -n 10 .venv/bin/python bench/index_scale.py                      # 1,000,000 x 512: auto + flat
    .venv/bin/python bench/index_scale.py --n 200000 --kinds auto         # auto = hnsw at this size

The vectors are a mixture: n / 100 subjects (random unit centres), each vector its subject
plus isotropic Gaussian noise (cosine to its subject about 0.7), L2-normalised, so a query's
true neighbours are the images of its subject, ranked by small differences, the way photos
of one subject crowd together (uniform random vectors would make every neighbour equally
far). Queries are new draws. Ground truth is brute force over all n, streamed from SQLite
chunk by chunk. The collection is written the
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

from polymodal.index.ann import NPROBE, choose_kind
from polymodal.index.collection import RESCORE, Collection
from polymodal.index.store import Store


def rss_gb() -> float:
    """Peak resident memory of this process so far (GB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def current_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k largest scores, best first."""
    part = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1)
    return np.take_along_axis(part, order, 1)


def draws(rng, centres: np.ndarray, n: int) -> np.ndarray:
    d = centres.shape[1]
    x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, d), np.float32) / np.sqrt(d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top_k(store, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of each query's k nearest vectors by brute force, streamed over the store."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for ids, x in store.iter_vectors(queries.shape[1]):
        scores = np.concatenate([best_s, queries @ x.T], axis=1)
        cand = np.concatenate([best_i, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
        top = top_k(scores, k)
        best_s, best_i = np.take_along_axis(scores, top, 1), np.take_along_axis(cand, top, 1)
    return best_i


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--kinds", default="auto,flat", help="comma-separated: auto, flat, hnsw, ivfpq")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="FAISS (OpenMP) threads")
    ap.add_argument("--dir", default=None, help="where to build the collection (default: a temporary folder)")
    ap.add_argument("--sweep", default=None, help="ivfpq only: nprobe:rescore pairs to time on the built "
                    "index besides the defaults, e.g. 16:100,64:100,64:200")
    ap.add_argument("--reuse", action="store_true", help="keep the collection in --dir if it holds n vectors")
    ap.add_argument("--flat-queries", type=int, default=100, help="queries timed on the exact index (each scans all n)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the figures here")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    d = args.dim
    faiss.omp_set_num_threads(args.threads)
    centres = rng.standard_normal((max(10, args.n // 100), d), np.float32)  # 100 images a subject
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    root = Path(args.dir or tempfile.mkdtemp(prefix="index-scale-"))
    reuse = args.reuse and (root / "meta.sqlite").is_file() and len(Store(root, readonly=True)) == args.n
    if not reuse:
        shutil.rmtree(root, ignore_errors=True)
        Store.initialise(root, {"model_id": "synthetic@0", "model_source": "", "dim": d, "generation": 0,
                                "deletions": 0})
    coll = Collection(Store(root))

    t0 = time.perf_counter()
    chunk = 10_000
    for s in range(0, 0 if reuse else args.n, chunk):
        x = draws(rng, centres, min(chunk, args.n - s))
        rows = [(f"/synthetic/{i:07d}.jpg", f"{i:064x}", 50_000, 0.0, 640, 480, "synthetic@0")
                for i in range(s, s + len(x))]
        coll.add_vectors(rows, x)
    ingest = time.perf_counter() - t0
    db_gb = sum(p.stat().st_size for p in root.glob("meta.sqlite*")) / 1e9
    print(f"{args.n:,} x {d} vectors into SQLite: " + ("reused from an earlier run" if reuse else
          f"{ingest:.1f} s ({args.n / ingest:,.0f} vectors/s)") + f", {db_gb:.2f} GB on disk", flush=True)

    queries = draws(np.random.default_rng(1), centres, args.queries)
    t0 = time.perf_counter()
    truth = exact_top_k(coll.store, queries, args.k)
    exact_s = time.perf_counter() - t0
    print(f"ground truth (numpy brute force, {args.queries} queries): {exact_s:.1f} s", flush=True)

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
        timed = queries[:args.flat_queries] if ann.kind == "flat" else queries
        for q in timed:
            t = time.perf_counter()
            hits = coll.search_vector(q, args.k)
            lat.append(time.perf_counter() - t)
            got.append([h.id for h in hits])
        recall = float(np.mean([len(set(g) & set(t.tolist())) / args.k for g, t in zip(got, truth[:len(got)], strict=True)]))
        lat_ms = np.array(lat) * 1e3
        row = {"kind": ann.kind, "asked": name, "build_s": round(build, 1), "index_file_gb": round(index_gb, 3),
               "rss_after_build_gb": round(rss1, 2), "rss_before_gb": round(rss0, 2), "peak_rss_gb": round(rss_gb(), 2),
               "p50_ms": round(float(np.percentile(lat_ms, 50)), 2), "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
               f"recall@{args.k}": round(recall, 4)}
        if ann.kind == "ivfpq":
            row.update(lists=int(ann.index.nlist), nprobe=int(ann.index.nprobe), pq_bytes=int(ann.index.pq.M))
        row["queries"] = len(timed)
        results["kinds"].append(row)
        print(json.dumps(row), flush=True)
        if ann.kind == "ivfpq" and args.sweep:
            for pair in args.sweep.split(","):
                ann.nprobe, coll.rescore = (int(v) for v in pair.split(":"))
                lat, got = [], []
                for q in queries:
                    t = time.perf_counter()
                    got.append([h.id for h in coll.search_vector(q, args.k)])
                    lat.append(time.perf_counter() - t)
                lat_ms = np.array(lat) * 1e3
                sweep = {"kind": "ivfpq", "nprobe": ann.nprobe, "rescore": coll.rescore,
                         "p50_ms": round(float(np.percentile(lat_ms, 50)), 2),
                         "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
                         f"recall@{args.k}": round(float(np.mean([len(set(g) & set(t.tolist())) / args.k
                                                                for g, t in zip(got, truth, strict=True)])), 4)}
                results.setdefault("sweep", []).append(sweep)
                print(json.dumps(sweep), flush=True)
            ann.nprobe, coll.rescore = NPROBE, RESCORE
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
