"""A bridge's training state on disk, so a killed run resumes where it was saved: the trained weights
(the frozen towers left out) in `NAME.safetensors` with the step in its metadata, and the optimizer's
moments in `NAME.optimizer.pt` (read back with `torch.load(weights_only=True)`). Each file is written
to a temporary name and then renamed, so a kill leaves either the old state or the new one."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def save_state(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, *,
               frozen: tuple[str, ...], name: str = "state") -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(frozen)}
    save_file(state, str(out / f"{name}.tmp"), metadata={"step": str(step)})
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, out / f"{name}.optimizer.tmp")
    (out / f"{name}.optimizer.tmp").replace(out / f"{name}.optimizer.pt")
    (out / f"{name}.tmp").replace(out / f"{name}.safetensors")


def load_state(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *,
               frozen: tuple[str, ...], name: str = "state") -> int:
    """The step a previous run saved (0: none), its weights and optimizer state loaded."""
    from safetensors import safe_open

    weights, moments = out / f"{name}.safetensors", out / f"{name}.optimizer.pt"
    if not weights.is_file() or not moments.is_file():
        return 0
    with safe_open(str(weights), "pt") as f:
        step = int((f.metadata() or {})["step"])
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or any(not k.startswith(frozen) for k in result.missing_keys):
        raise ValueError(f"{out}: the saved training state is not this recipe's model; start in a new --out")
    saved = torch.load(moments, weights_only=True)
    if saved.get("step") == step:  # else a kill fell between the two files: the moments start afresh
        optimizer.load_state_dict(saved["optimizer"])
    return step


__all__ = ["save_state", "load_state"]
