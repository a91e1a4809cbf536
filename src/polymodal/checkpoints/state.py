"""Reading weight files safely, and the exhaustive key map every converter goes through.

Weights load from safetensors, or from pickles only through `torch.load(weights_only=True)`.
A converter pulls each source tensor it needs from a `StateReader` by name; `finish()`
fails loudly if any source key was left unused, and the model loads the result with
`strict=True`, so a missing key or a shape mismatch is an error too (nanoGPT's
`from_pretrained` asserts the same).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from polymodal.config import save_config


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into."""


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a .safetensors / .bin / .pt file, or of a sharded index.json."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weight file")
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(read_state_dict(path.parent / shard))
        return state
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpicklable object is refused here, never executed
        raise CheckpointError(f"{path}: cannot be read as weights only ({type(e).__name__}: {e})") from e
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # a training checkpoint that wraps the weights
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return dict(state)


def find_weights(directory: Path) -> Path:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: no weights ({', '.join(WEIGHT_FILES)})")


class StateReader:
    """Hands out source tensors by name and remembers which were used."""

    def __init__(self, state: Mapping[str, Tensor], source: str = "checkpoint"):
        self.state = dict(state)
        self.source = source
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> Tensor:
        if key not in self.state:
            raise CheckpointError(f"{self.source}: missing key {key!r}")
        self.used.add(key)
        return self.state[key]

    def cat(self, keys: Iterable[str], dim: int = 0) -> Tensor:
        return torch.cat([self.take(k) for k in keys], dim=dim)

    def ignore(self, *keys: str) -> None:
        """Mark keys that carry nothing the model needs (buffers such as position_ids)."""
        self.used.update(k for k in keys if k in self.state)

    def finish(self) -> None:
        unused = sorted(set(self.state) - self.used)
        if unused:
            more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
            raise CheckpointError(f"{self.source}: {len(unused)} unused key(s): {unused[:8]}{more}")


def load_exact(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> nn.Module:
    """load_state_dict(strict=True) with every shape checked first, in one clear error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    bad = [f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or bad:
        raise CheckpointError(f"{source} does not fit the model: missing {missing[:8]}, "
                              f"unexpected {extra[:8]}, shape mismatches {bad[:8]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return model


def write_checkpoint(directory: str | Path, cfg, state: Mapping[str, Tensor], tokenizer=None) -> Path:
    """Our one format: `config.json` (the config dataclass), `model.safetensors`, the tokenizer files."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_config(cfg, directory / "config.json")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt", "library": "polymodal"})
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory
