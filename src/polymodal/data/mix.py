"""Several folder data sets as one: `out/<name>` links to each, and `out/captions.jsonl` holds
every record with its image path prefixed by `<name>/` and a `"dataset": <name>` field."""

from __future__ import annotations

import json
import os
from pathlib import Path

from polymodal.data.pairs import PairDataset


def mix(out: str | Path, sources: dict[str, str | Path]) -> dict:
    """Write the mixture; returns records per source. A rerun replaces the captions file."""
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
        for pair in data.pairs:
            lines.append(json.dumps({"image": f"{name}/{pair.image}", "text": pair.text, **pair.meta, "dataset": name}))
        counts[name] = len(data.pairs)
    tmp = out / "captions.jsonl.tmp"
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, out / "captions.jsonl")
    return counts
