"""Process-group helpers for `torchrun`: who am I, how many are we, and the bare model.

Everything here is a thin reading of `torch.distributed`; with no process group every
helper answers as a single process would (rank 0 of 1), so code needs no `if` for it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def init_from_env() -> torch.device:
    """Join the process group that `torchrun` describes (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT): nccl on GPUs, gloo on the CPU. Returns this rank's device;
    without torchrun's variables it starts nothing and returns the single-process device."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_dist():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        inner = model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else None
        inner = inner if inner is not None else getattr(model, "_orig_mod", None)  # torch.compile
        if inner is None:
            return model
        model = inner


def average_gradients(model: nn.Module) -> None:
    """Average `.grad` over ranks in place: what DDP does, for a backward DDP did not see."""
    if not is_dist():
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size()
