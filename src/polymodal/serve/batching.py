"""Dynamic batching of concurrent requests on one model, with a bounded queue.

A `Batcher` owns one worker thread (the model runs there, so the event loop never waits on
torch). `await batcher.submit(item)` queues one item and returns its result; the worker takes
the first waiting item, then keeps collecting for at most `max_wait` seconds or until
`max_batch` items, and runs `fn(items) -> results` once for all of them (the batching of
Clipper / Triton's dynamic batcher, Crankshaw et al. 2017). A result that is an exception is
raised in its own request only. Items whose `key(item)` differ never share a call (captions with
different generation options, say).

The queue is bounded: when `capacity` items are already waiting or running, `submit` raises
`Overloaded` at once (the server answers 503 with Retry-After) instead of queueing without end.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass


class Overloaded(RuntimeError):
    """The queue is full; `retry_after` is a guess, in whole seconds, of when it has room."""

    def __init__(self, name: str, capacity: int, retry_after: int):
        super().__init__(f"the {name} queue is full ({capacity} requests waiting or running): retry later")
        self.retry_after = retry_after


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    largest: int = 0  # the largest batch run so far
    seconds: float = 0.0  # time spent in fn

    def as_dict(self) -> dict:
        return {"batches": self.batches, "items": self.items, "largest_batch": self.largest,
                "mean_batch": round(self.items / self.batches, 2) if self.batches else 0.0}


class Batcher:
    def __init__(self, fn: Callable[[list], Sequence], *, name: str = "model", max_batch: int = 32,
                 max_wait: float = 0.005, capacity: int = 256, key: Callable[[object], Hashable] | None = None):
        if max_batch < 1 or capacity < 1 or max_wait < 0:
            raise ValueError("Batcher needs max_batch >= 1, capacity >= 1 and max_wait >= 0")
        self.fn, self.name, self.key = fn, name, key
        self.max_batch, self.max_wait, self.capacity = max_batch, max_wait, capacity
        self.stats = BatchStats()
        self._queue: queue.Queue = queue.Queue()
        self._held: list = []  # items taken from the queue whose key did not fit the last batch
        self._pending = 0  # waiting or running
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"polymodal-{name}-batcher", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def _retry_after(self) -> int:
        s = self.stats
        per_item = s.seconds / s.items if s.items else 0.05
        return max(1, math.ceil(self._pending * per_item))

    def submit(self, item) -> asyncio.Future:
        """A future of `fn`'s result for `item`, computed in a batch with whatever else is waiting.
        Raises Overloaded at once (not when awaited) when the queue is full. Call it from the loop."""
        with self._lock:
            if self._pending >= self.capacity:
                raise Overloaded(self.name, self.capacity, self._retry_after())
            self._pending += 1
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((item, future, loop))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    # --- the worker thread ------------------------------------------------------------------

    def _next(self, timeout: float | None):
        if self._held:
            return self._held.pop(0)
        return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

    def _collect(self, first) -> list:
        batch, key = [first], self.key(first[0]) if self.key else None
        deadline = time.monotonic() + self.max_wait
        skipped = []
        while len(batch) < self.max_batch:
            try:
                entry = self._next(deadline - time.monotonic())
            except queue.Empty:
                break
            if entry is None:  # close(): finish this batch first
                self._queue.put(None)
                break
            if self.key and self.key(entry[0]) != key:
                skipped.append(entry)
                continue
            batch.append(entry)
        self._held = skipped + self._held
        return batch

    def _run(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            batch = self._collect(first)
            items = [item for item, _, _ in batch]
            start = time.perf_counter()
            try:
                results = list(self.fn(items))
                if len(results) != len(items):
                    raise RuntimeError(f"{self.name}: {len(results)} results for {len(items)} items")
            except Exception as e:  # the model failed for the whole batch: every request hears it
                results = [e] * len(items)
            s = self.stats
            s.seconds += time.perf_counter() - start
            s.batches, s.items, s.largest = s.batches + 1, s.items + len(items), max(s.largest, len(items))
            with self._lock:
                self._pending -= len(batch)
            for (_, future, loop), result in zip(batch, results, strict=True):
                loop.call_soon_threadsafe(_settle, future, result)


def _settle(future: asyncio.Future, result) -> None:
    if future.done():  # the client went away
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


__all__ = ["Batcher", "BatchStats", "Overloaded"]
