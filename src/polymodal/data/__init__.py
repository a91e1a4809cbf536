"""Data for training: image-text pairs from a folder, tar shards, and the batches a trainer reads.

`PairDataset` (a folder with captions.jsonl / captions.csv) -> `write_shards` (WebDataset-style
tars, atomic and resumable) -> `TrainStream` (endless batches, split across ranks and workers,
resumable bit for bit), with `augment` applied before the image transform.

Names are imported on first use, so `polymodal.data.<builder>` modules and the pair and shard
tools do not pull in torch. (`polymodal.data.augment` is the module; the function is
`polymodal.data.augment.augment`.)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from polymodal.data.augment import AugmentConfig, augment_rng
    from polymodal.data.loader import TrainStream, gather_states
    from polymodal.data.pairs import Pair, PairDataset
    from polymodal.data.shard_writer import write_shards
    from polymodal.data.shards import (
        Sample,
        ShardReader,
        expand_braces,
        iter_samples,
        list_shards,
        read_manifest,
    )

_HOME = {
    "AugmentConfig": "augment", "augment_rng": "augment",
    "TrainStream": "loader", "gather_states": "loader",
    "Pair": "pairs", "PairDataset": "pairs",
    "Sample": "shards", "ShardReader": "shards", "expand_braces": "shards", "iter_samples": "shards",
    "list_shards": "shards", "read_manifest": "shards", "write_shards": "shard_writer",
}  # fmt: skip

__all__ = [
    "AugmentConfig",
    "Pair",
    "PairDataset",
    "Sample",
    "ShardReader",
    "TrainStream",
    "augment_rng",
    "expand_braces",
    "gather_states",
    "iter_samples",
    "list_shards",
    "read_manifest",
    "write_shards",
]


def __getattr__(name: str):
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'polymodal.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"polymodal.data.{home}"), name)
