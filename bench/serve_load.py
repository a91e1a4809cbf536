"""Load test of `polymodal serve`: 32 concurrent clients on /v1/embeddings and /v1/search.

    python bench/serve_load.py                     # the embedded default CLIP, 200 generated images
    python bench/serve_load.py --images DIR --clients 32 --seconds 10 --json

Starts `polymodal serve` in its own process on a free loopback port (127.0.0.1 only, nothing
leaves the machine), builds the collection first (or reuses --db), then for each endpoint runs
`--clients` threads, each with its own keep-alive connection, sending one request after another
for `--seconds` (bounded: at most --max-requests in all). Prints requests/s, p50, p99 and the
error count per endpoint; exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = ["red", "blue", "green", "yellow", "circle", "square", "cat", "dog", "car", "tree", "house", "face",
         "smiling", "flag", "heart", "star", "moon", "sun", "fruit", "apple", "boat", "bird", "fish", "flower"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_images(directory: Path, n: int) -> Path:
    from PIL import Image, ImageDraw

    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    colours = [(220, 30, 30), (30, 170, 60), (40, 60, 220), (235, 210, 30), (150, 60, 200)]
    for i in range(n):
        im = Image.new("RGB", (96, 96), tuple(rng.randint(150, 255) for _ in range(3)))
        d = ImageDraw.Draw(im)
        r, cx, cy = rng.randint(12, 30), rng.randint(30, 66), rng.randint(30, 66)
        (d.ellipse if i % 2 else d.rectangle)((cx - r, cy - r, cx + r, cy + r), fill=rng.choice(colours))
        im.save(directory / f"shape-{i:04d}.png")
    return directory


def request(conn: http.client.HTTPConnection, path: str, body: dict) -> int:
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    return r.status


def hammer(port: int, path: str, make_body, clients: int, seconds: float, max_requests: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    count = [0]
    stop_at = time.perf_counter() + seconds

    def client(seed: int):
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.perf_counter() < stop_at:
            with lock:
                if count[0] >= max_requests:
                    break
                count[0] += 1
            t0 = time.perf_counter()
            try:
                status = request(conn, path, make_body(rng))
            except (OSError, http.client.HTTPException) as e:
                status, conn = repr(e), http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            dt = time.perf_counter() - t0
            with lock:
                if status == 200:
                    latencies.append(dt)
                else:
                    errors.append(str(status))
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(p):
        return round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None

    return {"endpoint": path, "clients": clients, "requests": len(lat) + len(errors), "ok": len(lat),
            "errors": len(errors), "error_kinds": sorted(set(errors))[:5], "seconds": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 1), "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, help="A folder of images (default: generated shapes).")
    ap.add_argument("--n-images", type=int, default=200)
    ap.add_argument("--db", type=Path, help="An existing collection to serve (skips building).")
    ap.add_argument("--model", help="CLIP checkpoint (default: the embedded default model).")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0, help="Per endpoint.")
    ap.add_argument("--max-requests", type=int, default=20000, help="Per endpoint, at most.")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    db = args.db
    if db is None:
        from polymodal.index import build

        images = args.images or make_images(work / "images", args.n_images)
        db = work / "db"
        t0 = time.perf_counter()
        report = build(images, db, model=args.model, progress=False)
        print(f"collection: {report.added} images indexed in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    port = free_port()
    cmd = [sys.executable, "-m", "polymodal", "serve", "--db", str(db), "--port", str(port), "--host", "127.0.0.1",
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--queue-size", str(max(256, 4 * args.clients))]
    if args.model:
        cmd += ["--model", args.model]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                print(server.stderr.read().decode(), file=sys.stderr)
                return 2
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                health = json.loads(conn.getresponse().read())
                break
            except OSError:
                if time.monotonic() > deadline:
                    print("the server did not start", file=sys.stderr)
                    return 2
                time.sleep(0.2)
        # warm up both paths once
        warm = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        request(warm, "/v1/embeddings", {"input": "warm up"})
        request(warm, "/v1/search", {"query": "warm up", "k": 10})

        def text(rng):
            return " ".join(["a photo of a"] + rng.sample(WORDS, 2))

        results = [
            hammer(port, "/v1/embeddings", lambda rng: {"input": text(rng)}, args.clients, args.seconds,
                   args.max_requests),
            hammer(port, "/v1/search", lambda rng: {"query": text(rng), "k": 10}, args.clients, args.seconds,
                   args.max_requests),
        ]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        batching = json.loads(conn.getresponse().read())["batching"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    doc = {"model": health["model"], "images": health["collection"]["images"], "cpu_count": os.cpu_count(),
           "results": results, "batching": batching}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{doc['images']} images, model {doc['model']}, {args.clients} clients, {os.cpu_count()} CPUs")
        for r in results:
            print(f"{r['endpoint']:16s} {r['requests_per_s']:8.1f} req/s  p50 {r['p50_ms']} ms  "
                  f"p99 {r['p99_ms']} ms  errors {r['errors']}/{r['requests']}")
        b = batching["embedding"]
        print(f"batching: {b['items']} items in {b['batches']} batches (mean {b['mean_batch']}, "
              f"largest {b['largest_batch']})")
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
