"""Several folder data sets as one: `out/<name>` links to each, and `out/captions.jsonl` holds
every record with its image path prefixed by `<name>/` and a `"dataset": <name>` field.

The trainer draws records uniformly, so a source's share of the batches is its share of the
records. `repeats` raises a small source's share: its training records are written that many
times (its test records once, so evaluation counts are unchanged)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from polymodal.data.pairs import PairDataset


def mix(out: str | Path, sources: dict[str, str | Path], repeats: dict[str, int] | None = None) -> dict:
    """Write the mixture; returns records per source (repeats counted). A rerun replaces the captions file."""
    repeats = repeats or {}
    if unknown := sorted(set(repeats) - set(sources)):
        raise ValueError(f"--repeat names {unknown}, which are not sources ({', '.join(sources)})")
    if bad := {k: v for k, v in repeats.items() if not isinstance(v, int) or v < 1}:
        raise ValueError(f"repeats must be whole numbers >= 1: {bad}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    lines = []
    for name, src in sources.items():
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"source name {name!r}: use a plain folder name")
        data = PairDataset(src)  # reads (and checks) the source's captions
        link = out / name
        if link.is_symlink() or link.exists():
            if not (link.is_symlink() and link.resolve() == data.root.resolve()):
                raise ValueError(f"{link} exists and is not a link to {data.root}")
        else:
            link.symlink_to(data.root.resolve(), target_is_directory=True)
        counts[name] = 0
        for pair in data.pairs:
            line = json.dumps({"image": f"{name}/{pair.image}", "text": pair.text, **pair.meta, "dataset": name})
            times = repeats.get(name, 1) if pair.meta.get("split") == "train" else 1
            lines.extend([line] * times)
            counts[name] += times
    tmp = out / "captions.jsonl.tmp"
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, out / "captions.jsonl")
    return counts
