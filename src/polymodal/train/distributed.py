"""Process-group helpers for `torchrun`: who am I, how many are we, and the bare model.

Everything here is a thin reading of `torch.distributed`; with no process group every
helper answers as a single process would (rank 0 of 1), so code needs no `if` for it.
"""

from __future__ import annotations

import atexit
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
        atexit.register(_leave)  # an undestroyed group can abort a rank at exit (gloo's threads)
    return device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        inner = model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else None
        inner = inner if inner is not None else getattr(model, "_orig_mod", None)  # torch.compile
        if inner is None:
            return model
        model = inner


def fully_shard_model(model: nn.Module, blocks: list[nn.Module], methods: list[str] = ()) -> nn.Module:
    """FSDP2 in place: each of `blocks` is a unit (gathered for its own forward and backward,
    then freed), the rest of `model` the root unit; each rank keeps 1/W of every weight, its
    gradient and its optimizer state, on its device. After backward every gradient is the
    mean over ranks, as under DDP: FSDP reduce-scatters the sharded ones.

    `fully_shard` refuses scalar parameters (CLIP's `logit_scale`): those stay whole on every
    rank, outside FSDP, and a hook averages their gradient over ranks once it is accumulated.
    The other parameters are DTensors afterwards (build the optimizer after this), whole only
    inside `forward` and the `methods` that run the model like it: read nothing else of the
    model outside them (the loss takes `logit_scale` from the forward's output).
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in blocks:
        fully_shard(block)
    scalars = {p for p in model.parameters() if p.dim() == 0}
    fully_shard(model, ignored_params=scalars)
    for p in scalars:
        p.register_post_accumulate_grad_hook(_average_grad)
    for name in methods:
        register_fsdp_forward_method(model, name)
    return model


def _average_grad(p: torch.Tensor) -> None:
    dist.all_reduce(p.grad)  # gloo has no ReduceOp.AVG
    p.grad /= world_size()


def average_gradients(model: nn.Module) -> None:
    """Average `.grad` over ranks in place: what DDP does, for a backward DDP did not see.
    Gradients of FSDP's sharded parameters (DTensors) are averaged already and left alone."""
    if not is_dist():
        return
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if p.grad is not None and not isinstance(p.grad, DTensor):
            dist.all_reduce(p.grad)
            p.grad /= world_size()
