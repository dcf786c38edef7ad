"""Calling MoLE nodes directly (as the executor would, under inference mode) and making gate files."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.nodes._helpers import slots


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def load(mole, model, clip, *picks, experts=None):
    """MoLE Load Experts with ``(file, strength, on)`` picks."""
    with torch.inference_mode():
        return mole.loaders.MoleLoadExperts.execute(model=model, clip=clip, experts=experts, **slots(*picks)).args[0]


def apply(mole, model, experts, mode="gated", weights="", mask="", clip=None, gates=None, strength=1.0, buckets=4):
    """MoLE Apply → ``(model, clip, gates)``."""
    with torch.inference_mode():
        out = mole.apply.MoleApply.execute(model=model, experts=experts, mode=mode, strength=strength,
                                           weights=weights, mask=mask, timestep_buckets=buckets, clip=clip,
                                           gates=gates)
    return out.args


def load_gates(mole, name: str):
    with torch.inference_mode():
        return mole.gates.MoleLoadGates.execute(gate_file=name).args[0]


def _write_variant(mole, model, experts, folder: Path, name: str, make, clip=None):
    import mole_core

    _, _, fresh = apply(mole, model, experts, "gated", clip=clip)
    gf = fresh.gate_file
    tensors = {k: make(k, v) for k, v in gf.tensors.items()}
    mole_core.write_gate_file(mole_core.GateFile(gf.path, gf.config, gf.experts, gf.scopes, tensors, dict(gf.info)),
                              folder / name)
    return load_gates(mole, name)


def random_gates(mole, model, experts, folder: Path, name: str, std: float = 1.0, clip=None):
    """Input-dependent gates: random gate weights (via a gate file and MoLE Load Gates)."""
    gen = torch.Generator().manual_seed(9)

    def make(key: str, value: torch.Tensor) -> torch.Tensor:
        return torch.randn(value.shape, generator=gen) * std if key.endswith(".weight") else value.clone()
    return _write_variant(mole, model, experts, folder, name, make, clip)


def constant_gates(mole, model, experts, folder: Path, name: str, probs: list[float]):
    """Gates that ignore their input: zero weights, ``bias = log(probs)``, τ = 1."""
    bias = torch.tensor(probs).log()
    return _write_variant(mole, model, experts, folder, name,
                          lambda k, v: bias.clone() if k.endswith(".bias") else torch.zeros_like(v))
