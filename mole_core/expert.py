"""Experts: one LoRA each, as low-rank factors keyed by canonical target names."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .adapters import WeightDependent
from .errors import MoleError


@dataclass
class LoraFactor:
    """One expert at one target layer: ``ΔW = scale · up @ down``.

    Shapes: Linear ``down (r, in)``, ``up (out, r)``; Conv ``down (r, in, kh, kw)``,
    ``up (out, r, 1, 1)``. ``alpha`` None means scale 1 (diffusers convention).
    ``scale_override`` replaces ``alpha / r`` (PEFT rsLoRA, dense fallbacks).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    scale_override: float | None = None
    dense: bool = False  # a full-rank exact factorisation of a non-LoRA delta (LoHa, LoKr, diff)
    # a module whose delta depends on the layer's weight (GLoRA, OFT, BOFT, DoRA): resolved into a dense factor
    # when attached; until then ``down``/``up`` are its delta without the weight (DoRA on LoRA / LoHa / LoKr) or,
    # for GLoRA, OFT and BOFT, which have none, empty (rank 0)
    pending: WeightDependent | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        if self.scale_override is not None:
            return self.scale_override
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    def delta(self) -> torch.Tensor:
        """Dense ``ΔW`` in fp32 (Linear ``(out, in)``; Conv ``(out, in, kh, kw)``)."""
        down, up = self.down.float(), self.up.float()
        d = up.flatten(1) @ down.flatten(1)
        shape = (up.shape[0], *down.shape[1:])
        return (d * self.scale).reshape(shape)


def factor_from_delta(delta: torch.Tensor) -> LoraFactor:
    """Exact full-rank factorisation of a dense delta, so dense experts join the bank.

    Uses ``up = I`` (rank = out) or ``down = I`` (rank = in), whichever is smaller.
    """
    delta = delta.float()
    out_dim = delta.shape[0]
    in_numel = int(math.prod(delta.shape[1:]))
    if delta.dim() == 2 and delta.shape[1] < out_dim:
        return LoraFactor(down=torch.eye(delta.shape[1]), up=delta.clone(), scale_override=1.0, dense=True)
    if delta.dim() == 4 and delta.shape[2] == delta.shape[3] == 1 and in_numel < out_dim:
        eye = torch.eye(in_numel).reshape(in_numel, in_numel, 1, 1)
        return LoraFactor(down=eye, up=delta.clone(), scale_override=1.0, dense=True)
    up = torch.eye(out_dim)
    if delta.dim() == 4:
        up = up.reshape(out_dim, out_dim, 1, 1)
    return LoraFactor(down=delta.clone(), up=up, scale_override=1.0, dense=True)


@dataclass
class Expert:
    """A LoRA file turned into factors keyed by canonical names (``unet:...``, ``te:...``)."""

    name: str
    factors: dict[str, LoraFactor]
    sha256: str = ""
    path: str | None = None
    format: str = "unknown"
    strength: float = 1.0
    enabled: bool = True
    metadata: dict[str, str] = field(default_factory=dict)
    skipped_keys: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> list[int]:
        return sorted({f.rank for f in self.factors.values() if f.rank})  # rank 0: resolved when attached

    def components(self) -> list[str]:
        return sorted({k.split(":", 1)[0] for k in self.factors})

    def summary(self) -> dict:
        """JSON-able identity of the expert, as stored in gate files."""
        ranks = self.ranks
        return {"name": self.name, "sha256": self.sha256, "format": self.format,
                "rank": ranks[-1] if ranks else 0, "ranks": ranks, "targets": len(self.factors),
                "strength": self.strength}


def check_experts(experts: list[Expert]) -> None:
    """Validate a list of experts (count, finiteness); raise MoleError naming the culprit."""
    if not experts:
        raise MoleError("no experts: give at least one LoRA file")
    for e in experts:
        if not e.factors:
            raise MoleError(f"expert {e.name!r}: no LoRA targets")
        for key, f in e.factors.items():
            for role, t in (("down", f.down), ("up", f.up)):
                if not torch.isfinite(t).all():
                    raise MoleError(f"expert {e.name!r}: {role} tensor of {key} contains NaN/inf")
            if f.up.shape[1] != f.down.shape[0]:
                raise MoleError(f"expert {e.name!r}: {key}: up has rank {f.up.shape[1]}, "
                                f"down has rank {f.down.shape[0]}")
