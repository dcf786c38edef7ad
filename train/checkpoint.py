"""Resumable training state in one ``.safetensors`` file (no pickle), written atomically.

Holds the gate tensors, AdamW moments and step counts, the RNG state, the step, the loss
history and the config; resuming continues bit-exactly on CPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mole_core import Mixture, MoleError
from mole_core.gate_file import atomic_save
from mole_core.lora_files import read_safetensors

FORMAT = "mole-train-state"


@dataclass
class TrainState:
    """What a checkpoint restores."""

    step: int
    rng: torch.Tensor
    params: list[torch.Tensor]
    optim: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)


def _params(mixes: list[Mixture]) -> list[torch.nn.Parameter]:
    return [p for m in mixes for p in m.gate_parameters()]


def save_checkpoint(path: str | os.PathLike, mixes: list[Mixture], optimizer: torch.optim.Optimizer,
                    rng: torch.Generator, step: int, info: dict) -> Path:
    """Write the full resumable state (atomic: temp file + rename)."""
    params = _params(mixes)
    tensors: dict[str, torch.Tensor] = {"rng": rng.get_state()}
    for i, p in enumerate(params):
        tensors[f"param.{i}"] = p.detach()
        for k, v in optimizer.state.get(p, {}).items():
            if torch.is_tensor(v):
                tensors[f"optim.{i}.{k}"] = v.detach().reshape(v.shape)
    meta = {"format": FORMAT, "step": step, "n_params": len(params),
            "shapes": [list(p.shape) for p in params], **info}
    atomic_save(tensors, path, {"format": "pt", "mole_state": json.dumps(meta)})
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> TrainState:
    """Read a checkpoint; one-line MoleError when it is missing, corrupt or not ours."""
    tensors, meta = read_safetensors(path)
    name = Path(path).name
    try:
        info = json.loads(meta["mole_state"])
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise ValueError("not a MoLE training state")
        n = int(info["n_params"])
        params = [tensors[f"param.{i}"] for i in range(n)]
        rng = tensors["rng"]
    except (KeyError, TypeError, json.JSONDecodeError, ValueError):
        raise MoleError(f"{name}: not a MoLE training checkpoint (or it is corrupt)") from None
    optim = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    return TrainState(int(info["step"]), rng, params, optim, info)


def restore(state: TrainState, mixes: list[Mixture], optimizer: torch.optim.Optimizer,
            rng: torch.Generator, path: str = "checkpoint") -> None:
    """Load params, optimizer moments and RNG into a freshly built run."""
    params = _params(mixes)
    if len(params) != len(state.params) or any(p.shape != q.shape for p, q in zip(params, state.params)):
        raise MoleError(f"{Path(path).name}: checkpoint gates do not fit this run "
                        "(different experts, granularity or gate input)")
    with torch.no_grad():
        for p, q in zip(params, state.params):
            p.copy_(q)
    for i, p in enumerate(params):
        entries = {k.split(".", 2)[2]: v for k, v in state.optim.items() if k.startswith(f"optim.{i}.")}
        if entries:
            optimizer.state[p] = {k: v.clone().to(p.device) if k != "step" else v.clone() for k, v in entries.items()}
    rng.set_state(state.rng)
