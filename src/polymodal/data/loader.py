"""The batches a contrastive trainer iterates: endless, split across ranks and workers, resumable.

`TrainStream` reads a folder of pairs (`PairDataset`) or tar shards and yields, forever,

    {"pixels": (B, 3, S, S) float32, "input_ids": (B, L) long, "attention_mask": (B, L) long,
     "skipped": int, "keys": list[str]}

with L the longest text of the batch, `skipped` the bad samples (missing, zero-byte or
corrupt image, empty text, broken shard member) dropped while this batch was filled (a bad
sample never stops the stream: the batch is filled from the samples after it; the reasons go
to `TrainStream.problems`), and `keys` the samples' ids (a folder's pair index, zero-padded to
nine digits, or "shard.tar:key").

Who reads what. Each rank runs `max(1, workers)` consumers (one per DataLoader worker, or one
in the main process); consumer `w` of rank `r` has the global number `c = r + world_size * w`
of `C = world_size * max(1, workers)`. Every epoch reshuffles from (seed, epoch).

- Folder: the epoch's permutation of the N pairs is cut into strided slices: rank r takes
  `perm[r::world_size]`, its consumer w every `workers`-th of that. Each slice is trimmed to
  `N // C` pairs, so all consumers get the same count and no two share a pair; the at most
  C - 1 pairs left over change with every epoch's shuffle.
- Shards: the epoch's permutation of the S shards is dealt round-robin, shard i to consumer
  `i % C`. When C does not divide S the deal is padded by wrapping round to the start of the
  permutation, so every consumer gets `ceil(S / C)` shards and a few shards are read twice
  that epoch; nothing is left out. (S < C is allowed, with a warning: most consumers then
  repeat shards.) Within a shard, a buffer of `shuffle_buffer` samples reshuffles the
  stream; `write_shards` already mixes the set when it writes.

An epoch belongs to a consumer: consumer c moves on to its next epoch when its own slice is
done (the last partial batch is dropped when `drop_last`). Bad samples and unequal shards make
consumers' epochs end at different batches; that is harmless because no consumer ever runs
dry - every rank can always give its next batch, so DDP never waits on a rank that has stopped.

Resuming. `state_dict()` holds, for each consumer, (epoch, shard slot, samples consumed), and
the number of batches given. `TrainStream(..., start=state)` continues with exactly the batches
an uninterrupted stream would have given next: folder consumers jump to their position without
reading anything; shard consumers re-read the current shard's members up to it (bytes only,
never decoded). Augmentation draws from `augment_rng(seed, epoch, sample)`, so it is the same
whatever the worker count, rank, or resume point (the worker count does change which samples
share a batch: a rank's batches come from its consumers in turn). A state resumes only the same
set-up (source size, batch size, seed, rank, world size, workers, drop_last, shuffle buffer);
another is refused with a ValueError. Under DDP each rank's state differs (its bad samples
differ): save all of them (`gather_states`, a collective) and pass the list as `start`.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from polymodal.config import ImageTransformConfig
from polymodal.data.augment import AugmentConfig, augment, augment_rng
from polymodal.data.pairs import CAPTION_FILES, PairDataset
from polymodal.data.shards import _is_shard, iter_samples, list_shards
from polymodal.processing.image import load_image
from polymodal.processing.image import transform as to_tensor
from polymodal.processing.tokenizer import Tokenizer
from polymodal.train import distributed
from polymodal.train.negatives import hard_negative

PROBLEMS_KEPT = 1000  # the last bad samples TrainStream.problems remembers
_OTHER_SPLIT = "in another split"  # an item passed over, not a bad sample


@dataclass(frozen=True)
class _Setup:
    """Everything a consumer needs; sent once to each DataLoader worker."""

    kind: str  # "pairs" or "shards"
    dataset: PairDataset | None
    shards: tuple[str, ...]
    transform: ImageTransformConfig
    tokenizer: Tokenizer
    batch_size: int
    seed: int
    augment_seed: int
    rank: int
    world_size: int
    consumers: int  # per rank: max(1, workers)
    augment: AugmentConfig | None
    drop_last: bool
    shuffle_buffer: int
    split: str | None  # shards: samples whose metadata names another split are passed over
    negatives: bool = False  # also a hard negative caption per sample (train/negatives.py)

    @property
    def size(self) -> int:
        return len(self.dataset) if self.dataset is not None else len(self.shards)


# --- what each consumer reads ---------------------------------------------------------------------
# An item is (position after it, key, sample id, image source, text, error); position is (slot, offset).


def _pair_slice(s: _Setup, epoch: int, lid: int) -> np.ndarray:
    n, total = len(s.dataset), s.world_size * s.consumers
    perm = np.random.default_rng([s.seed, epoch]).permutation(n)
    return perm[s.rank :: s.world_size][lid :: s.consumers][: n // total]


def _pair_items(s: _Setup, epoch: int, lid: int, slot: int, offset: int) -> Iterator[tuple]:
    order = _pair_slice(s, epoch, lid)
    for pos in range(offset, len(order)):  # a resumed consumer starts here: nothing before is read
        index = int(order[pos])
        path, text = s.dataset[index]
        yield (0, pos + 1), f"{index:09d}", index, path, text, None


def _shard_deal(s: _Setup, epoch: int, lid: int) -> list[str]:
    total = s.world_size * s.consumers
    per = math.ceil(len(s.shards) / total)
    order = np.random.default_rng([s.seed, epoch]).permutation(len(s.shards))
    dealt = np.resize(order, total * per)  # wraps round: the first shards again fill the deal
    return [s.shards[i] for i in dealt[s.rank + s.world_size * lid :: total]]


def _sample_id(shard: str, key: str) -> int:
    digest = hashlib.blake2b(f"{os.path.basename(shard)}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _buffered(items: Iterator, rng: np.random.Generator, size: int) -> Iterator:
    """A shuffle buffer: hold `size` items, give a random one as each new one arrives."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = item
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


def _shard_items(s: _Setup, epoch: int, lid: int, slot: int, offset: int) -> Iterator[tuple]:
    shards = _shard_deal(s, epoch, lid)
    for j in range(slot, len(shards)):
        shard = shards[j]
        rng = np.random.default_rng([s.seed, epoch, _sample_id(shard, "")])
        for n, sample in enumerate(_buffered(iter_samples(shard), rng, s.shuffle_buffer)):
            if j == slot and n < offset:
                continue  # resuming: re-read, never decoded
            key = f"{os.path.basename(shard)}:{sample.key}"
            if s.split is not None and sample.ok and sample.meta.get("split", s.split) != s.split:
                yield (j, n + 1), key, 0, None, None, _OTHER_SPLIT
                continue
            yield (j, n + 1), key, _sample_id(shard, sample.key), sample.image, sample.text, sample.error


# --- batches --------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _pixels(s: _Setup, epoch: int, sample_id: int, image, text: str | None) -> torch.Tensor:
    if not text or not text.strip():
        raise ValueError("empty text")
    im = load_image(image)
    if s.augment is not None:
        im = augment(im, s.augment, augment_rng(s.augment_seed, epoch, sample_id))
    return to_tensor(im, s.transform)  # (3, S, S)


def _negative(s: _Setup, epoch: int, sample_id: int, text: str) -> str | None:
    rng = random.Random(hash((s.augment_seed, epoch, sample_id)))  # the same on a resumed run
    return hard_negative(text, rng)


def _collate(s: _Setup, pixels: list, texts: list, keys: list, skipped: int, negatives: list) -> dict:
    B = len(texts)
    # a row without a negative carries its own caption in that slot, masked out by has_negative
    tokens = s.tokenizer(texts + [n or t for n, t in zip(negatives, texts, strict=True)] if negatives else texts)
    batch = {
        "pixels": torch.stack(pixels),  # (B, 3, S, S)
        "input_ids": tokens["input_ids"][:B],  # (B, L)
        "attention_mask": tokens["attention_mask"][:B],  # (B, L)
        "skipped": skipped,
        "keys": keys,
    }
    if negatives:
        batch["negative_ids"] = tokens["input_ids"][B:]  # (B, L), padded like input_ids
        batch["negative_mask"] = tokens["attention_mask"][B:]
        batch["has_negative"] = torch.tensor([n is not None for n in negatives])  # (B,)
    return batch


def _batches(s: _Setup, lid: int, state: list[int]) -> Iterator[tuple[dict, list[int], list]]:
    """Consumer `lid`'s batches forever, each with the state after it and its problems."""
    epoch, slot, offset = state
    items = _pair_items if s.kind == "pairs" else _shard_items
    pixels, texts, keys, negatives, skipped, problems = [], [], [], [], 0, []
    while True:
        whole, made, position = (slot, offset) == (0, 0), 0, (slot, offset)
        for position, key, sample_id, image, text, error in items(s, epoch, lid, slot, offset):
            if error is None:
                try:
                    x = _pixels(s, epoch, sample_id, image, text)
                except (ValueError, OSError) as e:  # ImageError is a ValueError
                    error = _one_line(e)
            if error is _OTHER_SPLIT:
                continue
            if error is not None:
                skipped += 1
                problems.append((key, error))
                continue
            pixels.append(x)
            texts.append(text)
            keys.append(key)
            if s.negatives:
                negatives.append(_negative(s, epoch, sample_id, text))
            if len(pixels) == s.batch_size:
                yield _collate(s, pixels, texts, keys, skipped, negatives), [epoch, *position], problems
                pixels, texts, keys, negatives, skipped, problems = [], [], [], [], 0, []
                made += 1
        if pixels and not s.drop_last:
            yield _collate(s, pixels, texts, keys, skipped, negatives), [epoch, *position], problems
            skipped, problems = 0, []
            made += 1
        pixels, texts, keys, negatives = [], [], [], []  # drop_last: the epoch's last, partial batch
        if whole and made == 0:
            raise RuntimeError(
                f"rank {s.rank}, consumer {lid}: epoch {epoch} gave no batch of {s.batch_size}: too few "
                f"usable samples ({skipped} bad ones skipped so far)"
            )
        epoch, slot, offset = epoch + 1, 0, 0


class _WorkerStream(IterableDataset):
    """Runs in each DataLoader worker: worker i plays consumer (i + first) % workers, so that a
    resumed stream's first batch comes from the consumer whose turn it is."""

    def __init__(self, setup: _Setup, states: list[list[int]], first: int):
        self.setup, self.states, self.first = setup, states, first

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.setup.consumers:
            raise RuntimeError(f"_WorkerStream: {workers} workers for {self.setup.consumers} consumers")
        lid = (worker + self.first) % workers
        for batch, state, problems in _batches(self.setup, lid, self.states[lid]):
            yield lid, batch, state, problems


def _identity(item):
    return item


def _resolve(source, split: str | None) -> tuple[str, PairDataset | None, tuple[str, ...]]:
    if isinstance(source, PairDataset):
        if split is not None and source.split != split and any("split" in p.meta for p in source.pairs):
            raise ValueError(f"split={split!r} given with a PairDataset of split {source.split!r}")
        return "pairs", source, ()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        captions = path.is_file() and path.name in CAPTION_FILES
        if captions or (path.is_dir() and any((path / name).is_file() for name in CAPTION_FILES)):
            return "pairs", PairDataset(path, split=split), ()
        if path.is_dir() and not any(_is_shard(p) for p in path.iterdir()):
            raise FileNotFoundError(f"{path}: neither {' nor '.join(CAPTION_FILES)} nor tar shards")
    return "shards", None, tuple(str(p) for p in list_shards(source))


class TrainStream:
    """Endless, shuffled, rank- and worker-split, resumable batches for contrastive training.

    source: a PairDataset, a folder with captions.jsonl / captions.csv, or shards (a folder of
    tars, a glob, brace notation, a list). rank / world_size: default to the process group's
    (a single process without one). workers: DataLoader worker processes (0: read in this
    process). start: a `state_dict()` (or, under DDP, the list of every rank's) to resume from.
    split: keep the pairs of this split, when the records have splits (a folder: see
    `PairDataset`; shards: a sample whose metadata names another split is passed over, one
    with no split is kept). negatives: each batch also holds a hard negative caption per sample
    (`negative_ids`, `negative_mask`, `has_negative`; train/negatives.py), drawn the same way again
    on a resumed run.
    See the module doc for how data is split and resumed.
    """

    def __init__(
        self,
        source,
        *,
        transform: ImageTransformConfig,
        tokenizer: Tokenizer,
        batch_size: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        workers: int = 0,
        augment: AugmentConfig | None = None,
        drop_last: bool = True,
        start: dict | list[dict] | None = None,
        split: str | None = None,
        shuffle_buffer: int = 1000,
        negatives: bool = False,
    ):
        rank = distributed.rank() if rank is None else rank
        world_size = distributed.world_size() if world_size is None else world_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        kind, dataset, shards = _resolve(source, split)
        consumers = max(1, workers)
        total = world_size * consumers
        self.workers = workers
        self._setup = _Setup(
            kind, dataset, shards, transform, tokenizer, batch_size, seed,
            augment.seed if augment is not None and augment.seed is not None else seed,
            rank, world_size, consumers, augment, drop_last, max(1, shuffle_buffer), split, negatives,
        )  # fmt: skip
        if kind == "pairs":
            per = len(dataset) // total
            if per == 0 or (drop_last and per < batch_size):
                raise ValueError(
                    f"{dataset.root}: {len(dataset)} pairs give each of {total} readers ({world_size} ranks x "
                    f"{consumers} workers) {per} per epoch, fewer than batch_size {batch_size}"
                )
        elif len(shards) < total:
            warnings.warn(
                f"{len(shards)} shards for {total} readers ({world_size} ranks x {consumers} workers): "
                "shards are read by several readers each epoch; write smaller shards",
                stacklevel=2,
            )
        self._states = [[0, 0, 0] for _ in range(consumers)]
        self._batches = 0
        self.skipped = 0  # bad samples dropped over the batches given so far
        self.problems: deque[tuple[str, str]] = deque(maxlen=PROBLEMS_KEPT)  # (key, reason)
        self._active = None
        if start is not None:
            self._resume(start)

    def __repr__(self) -> str:
        s = self._setup
        return (
            f"TrainStream({s.kind}: {s.size}, batch_size={s.batch_size}, rank={s.rank}/{s.world_size}, "
            f"workers={self.workers}, epoch={min(st[0] for st in self._states)}, batches={self._batches})"
        )

    # --- state ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where the stream stands after the batches it has given: enough to resume exactly."""
        s = self._setup
        return {
            "epoch": min(state[0] for state in self._states),
            "batches": self._batches,
            "consumers": [list(state) for state in self._states],  # [epoch, shard slot, samples consumed]
            "source": s.kind,
            "size": s.size,
            "batch_size": s.batch_size,
            "seed": s.seed,
            "rank": s.rank,
            "world_size": s.world_size,
            "workers": s.consumers,
            "drop_last": s.drop_last,
            "shuffle_buffer": s.shuffle_buffer,
        }

    def _resume(self, start: dict | list[dict]) -> None:
        s = self._setup
        if isinstance(start, (list, tuple)):
            if len(start) != s.world_size:
                raise ValueError(f"start holds {len(start)} rank states for a world of {s.world_size}")
            start = start[s.rank]
        expected = {
            "source": s.kind, "size": s.size, "batch_size": s.batch_size, "seed": s.seed,
            "rank": s.rank, "world_size": s.world_size, "workers": s.consumers, "drop_last": s.drop_last,
            "shuffle_buffer": s.shuffle_buffer,
        }  # fmt: skip
        for name, value in expected.items():
            if start.get(name) != value:
                raise ValueError(
                    f"cannot resume: the state was saved with {name}={start.get(name)!r}, this stream has {value!r}"
                )
        consumers = start.get("consumers")
        if not (isinstance(consumers, list) and len(consumers) == s.consumers
                and all(isinstance(c, list) and len(c) == 3 for c in consumers)):  # fmt: skip
            raise ValueError("cannot resume: the state's 'consumers' is not one [epoch, slot, offset] per worker")
        self._states = [[int(v) for v in c] for c in consumers]
        self._batches = int(start["batches"])

    # --- iteration --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        """Batches from where the stream stands; a new iteration closes the previous one."""
        self.close()
        self._active = self._iterate()
        return self._active

    def close(self) -> None:
        """Stop the worker processes, if any; the state stays and iteration can start again."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def _record(self, lid: int, state: list[int], batch: dict, problems: list) -> None:
        self._states[lid] = state
        self._batches += 1
        self.skipped += batch["skipped"]
        self.problems.extend(problems)

    def _iterate(self) -> Iterator[dict]:
        s = self._setup
        if self.workers == 0:
            for batch, state, problems in _batches(s, 0, list(self._states[0])):
                self._record(0, state, batch, problems)
                yield batch
            return
        stream = _WorkerStream(s, [list(state) for state in self._states], self._batches % s.consumers)
        loader = DataLoader(stream, batch_size=None, num_workers=self.workers, collate_fn=_identity)
        it = iter(loader)
        try:
            for lid, batch, state, problems in it:
                if lid != self._batches % s.consumers:  # DataLoader takes workers in turn
                    raise RuntimeError(f"TrainStream: batch {self._batches} came from worker {lid}, out of turn")
                self._record(lid, state, batch, problems)
                yield batch
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def gather_states(stream: TrainStream) -> list[dict]:
    """Every rank's `state_dict()`, in rank order (a collective: call it on every rank)."""
    state = stream.state_dict()
    if not distributed.is_dist():
        return [state]
    states = [None] * distributed.world_size()
    torch.distributed.all_gather_object(states, state)
    return states
