"""How many CPU cores the rest of the machine leaves free, and running a block on a set number of
torch threads: the Whisper decoder picks one or two decoding threads from them (tasks/asr.py)."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch


@contextmanager
def threads_for(n: int | None, device: torch.device):
    """Run the block on n CPU threads (torch's setting is process-wide; restored afterwards)."""
    if n is None or device.type != "cpu" or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class CoreMeter:
    """How many cores other processes kept busy between two calls of `others()`: the machine's busy
    time (/proc/stat) less this process's CPU time, over the wall time between. None where
    /proc/stat cannot be read (not Linux), or on the first call."""

    def __init__(self):
        self.last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        except (OSError, ValueError):
            return None
        own = os.times()
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        return busy, own.user + own.system, time.monotonic()

    def others(self) -> float | None:
        now, then = self._sample(), self.last
        self.last = now
        if now is None or then is None or now[2] - then[2] < 0.05:  # too short to count clock ticks in
            return None
        return max(0.0, (now[0] - then[0]) - (now[1] - then[1])) / (now[2] - then[2])


__all__ = ["CoreMeter", "threads_for"]
