"""Commands over image collections: index, search, dedup, cluster, merge (library: polymodal.index)."""

from __future__ import annotations

from pathlib import Path

import typer

from polymodal.cli import JSON, MODEL, _console, _emit, _progress, command, say

DB = typer.Option(..., "--db", help="The collection directory (SQLite metadata + FAISS index).")


def _open(db: Path, model: str | None):
    from polymodal.index import Collection

    return Collection.open(db, model)


def _shard(value: str | None) -> tuple[int, int] | None:
    """'i/n' -> (i, n); 'auto' reads torchrun's RANK and WORLD_SIZE."""
    import os

    if value is None:
        return None
    if value == "auto":
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise ValueError(f"--shard {value!r}: expected i/n (0 <= i < n) or auto") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {value!r}: expected 0 <= i < n")
    return i, n


def _hits_table(title: str, hits) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    for name in ("#", "score", "id", "size"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("path", overflow="fold")  # the path is the answer: wrapped, never cut
    for n, h in enumerate(hits, 1):
        table.add_row(str(n), f"{h.score:.3f}", str(h.id), f"{h.width}x{h.height}", escape(h.path))
    _console().print(table)


@command
def index(
    directory: Path = typer.Argument(..., help="The folder of images to index (walked recursively)."),
    db: Path = DB,
    model: str = MODEL,
    report: Path = typer.Option(None, "--report", help="Write the bad files here, one JSON object a line."),
    workers: int = typer.Option(None, "--workers", min=0, help="Decoding processes (default: CPUs - 1; 0: none)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images embedded and committed together."),
    index_kind: str = typer.Option(None, "--index-kind", help="auto, flat, hnsw or ivfpq (default: auto, "
                                   "or what the collection has): exact below 50,000 images, HNSW below 500,000, IVF-PQ above."),
    shard: str = typer.Option(None, "--shard", help="i/n: index only the i-th of n parts of the folder (one "
                              "machine's share); 'auto' takes RANK/WORLD_SIZE from torchrun. '{rank}' in "
                              "--db becomes i; join the parts with `polymodal merge`."),
    json_: bool = JSON,
) -> None:
    """Embed the new and changed images of a folder into a collection; forget deleted ones.
    Crash-safe: a killed run leaves a usable collection and a rerun goes on where it stopped."""
    from polymodal.index import build

    part = _shard(shard)
    if part is not None and "{rank}" in str(db):
        db = Path(str(db).replace("{rank}", str(part[0])))
    result = build(directory, db, model, report=report, progress=_progress(), workers=workers,
                   batch_size=batch_size, index_kind=index_kind, shard=part,
                   on_bad=lambda message: say(f"skipped: {message}"))
    if json_:
        return _emit({"db": str(db), **result.as_dict(), "report": report and str(report)})
    typer.echo(f"{db}: {result.total} images ({result.index_kind} index); this run: {result.added} embedded, "
               f"{result.reused} reused, {result.unchanged} unchanged, {result.removed} removed, "
               f"{len(result.bad)} bad, {result.seconds:.1f} s ({result.images_per_s:.1f} images/s)"
               + (f"; bad files -> {report}" if report else ""))


@command
def search(
    query: str = typer.Argument(None, help="A text to search the images with."),
    db: Path = DB,
    k: int = typer.Option(10, "--k", "-k", min=1, help="How many results."),
    image: Path = typer.Option(None, "--image", "-i", help="Search with this image instead (image -> image)."),
    texts: Path = typer.Option(None, "--texts", help="Image -> text: rank these captions (one a line) "
                               "against --image (a file, or a path or id in the collection)."),
    model: str = typer.Option(None, "--model", "-m", help="Check the collection against this model "
                              "(default: the model recorded in the collection)."),
    json_: bool = JSON,
) -> None:
    """Search a collection: text -> image, image -> image (--image), image -> text (--image --texts)."""
    if (query is None) == (image is None):
        raise ValueError("give a text query or --image (one of them)")
    coll = _open(db, model)
    if texts is not None:
        if image is None:
            raise ValueError("--texts ranks captions against an image: give --image")
        captions = [t.strip() for t in texts.read_text(encoding="utf-8").splitlines() if t.strip()]
        if not captions:
            raise ValueError(f"{texts}: no captions (one a line)")
        item = int(str(image)) if str(image).isdigit() and not image.exists() else str(image)
        ranked = coll.rank_texts(item, captions)[:k]
        if json_:
            return _emit({"image": str(image), "texts": [{"text": t, "score": s} for t, s in ranked]})
        for t, s in ranked:
            typer.echo(f"{s:.3f}  {t}")
        return
    hits = coll.search_text(query, k) if query is not None else coll.search_image(str(image), k)
    if json_:
        return _emit({"query": query if query is not None else str(image), "collection": len(coll),
                      "hits": [h.__dict__ for h in hits]})
    _hits_table(f"{query!r}" if query is not None else f"images like {image}", hits)


@command
def dedup(
    db: Path = DB,
    threshold: float = typer.Option(0.95, "--threshold", min=-1.0, max=1.0,
                                    help="Cosine similarity at which two images count as duplicates."),
    json_: bool = JSON,
) -> None:
    """Groups of near-duplicate images in a collection."""
    groups = _open(db, None).dedup(threshold)
    if json_:
        return _emit({"threshold": threshold, "groups": [[h.__dict__ for h in g] for g in groups]})
    if not groups:
        typer.echo(f"no near-duplicates at cosine >= {threshold}")
    for n, g in enumerate(groups, 1):
        typer.echo(f"group {n} ({len(g)} images):")
        for h in g:
            typer.echo(f"  {h.score:.3f}  {h.path}")


@command
def cluster(
    db: Path = DB,
    k: int = typer.Option(8, "--k", "-k", min=1, help="How many clusters."),
    keywords: Path = typer.Option(None, "--keywords", help="Words to name the clusters with, one a line "
                                  "(default: a built-in vocabulary of about 150 everyday words)."),
    template: str = typer.Option("a photo of a {}.", "--template", help="'{}' becomes the keyword."),
    map_: Path = typer.Option(Path("clusters.png"), "--map", help="Where to draw the 2-D map of the clusters."),
    seed: int = typer.Option(0, "--seed", help="k-means seed."),
    json_: bool = JSON,
) -> None:
    """k-means over a collection's embeddings; each cluster named by its nearest keywords; a 2-D map."""
    from polymodal.index.cluster import draw_cluster_map, read_keywords

    words = read_keywords(keywords) if keywords else None
    coll = _open(db, None)
    clusters = coll.cluster(k, words, seed=seed, template=template)
    map_.parent.mkdir(parents=True, exist_ok=True)
    draw_cluster_map(coll, clusters).save(map_)
    if json_:
        return _emit({"k": k, "map": str(map_), "clusters": [c.as_dict() for c in clusters]})
    for c in clusters:
        typer.echo(f"cluster {c.id} ({c.size} images): " + ", ".join(f"{w} ({s:.2f})" for w, s in c.names))
        for h in c.examples[:3]:
            typer.echo(f"    {h.path}")
    typer.echo(f"map -> {map_}")


@command
def merge(
    shards: list[Path] = typer.Argument(..., help="Shard collections (built with `polymodal index --shard`)."),
    db: Path = DB,
    index_kind: str = typer.Option(None, "--index-kind", help="auto, flat, hnsw or ivfpq (default: auto)."),
    json_: bool = JSON,
) -> None:
    """Join shard collections into one (same model; nothing is embedded again); a rerun completes a killed one."""
    from polymodal.index import merge as run_merge

    result = run_merge(shards, db, index_kind=index_kind)
    if json_:
        return _emit({"db": str(db), **result})
    typer.echo(f"{db}: {result['total']} images ({result['index_kind']} index); {result['copied']} copied "
               f"from {len(shards)} shards, {result['skipped']} already there")
