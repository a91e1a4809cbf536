"""Folder jobs that a rerun resumes: the files still to do, given the JSON lines already written."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def pending_files(folder, out_jsonl, suffixes: tuple[str, ...]) -> tuple[list[Path], list[Path]]:
    """(every file under `folder` whose suffix is in `suffixes`, sorted; those not yet in
    `out_jsonl`, whose lines are JSON objects with a "path"). A line cut short by a crash does not
    count, so its file is done again."""
    folder, out = Path(folder), Path(out_jsonl)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory")
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in suffixes]
    done = set()
    if out.is_file():
        for line in out.read_text(encoding="utf-8").splitlines():
            try:
                done.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                continue
    return paths, [p for p in paths if str(p) not in done]


@contextmanager
def progress_bar(enabled: bool, total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A transient rich progress bar over `total` files (none when not `enabled` or nothing to do);
    yields advance(n=1)."""
    if not enabled or not total:
        yield lambda n=1: None
        return
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.start()
    task = bar.add_task(description, total=total)
    try:
        yield lambda n=1: bar.advance(task, n)
    finally:
        bar.stop()
