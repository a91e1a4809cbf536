"""Folder jobs that a rerun resumes: the files still to do, given the JSON lines already written."""

from __future__ import annotations

import json
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
