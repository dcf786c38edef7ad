"""Gating functions: one small softmax router per scope (paper Eq. 9–11).

``g = softmax((W f + b) / τ)`` with ``f`` a pooled, RMS-normalised feature vector, so the gate
works at any resolution and token count. ``W`` starts at zero (or noise of ``init_std``) and
``b`` at 0, hence training starts at uniform mixing (1/N each) — the NLA baseline. τ is learnable, kept in
``tau_range`` by a clamp.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import MoleError
from .naming import GRANULARITIES

GATE_INPUTS = ("input", "experts", "prompt")
MODES = ("gated", "uniform", "static")


@dataclass
class GateConfig:
    """How gates are shaped (stored in gate files)."""

    granularity: str = field(default="block", metadata={"help": "matrix | layer | block | network"})
    gate_input: str = field(default="input", metadata={"help": "input: pooled scope input; "
                                                       "experts: pooled normalised expert outputs; "
                                                       "prompt: max-pooled prompt conditioning (UNet scopes)"})
    tau_init: float = field(default=1.0, metadata={"help": "initial softmax temperature"})
    tau_min: float = field(default=0.05, metadata={"help": "lower clamp of τ"})
    tau_max: float = field(default=10.0, metadata={"help": "upper clamp of τ"})
    init_std: float = field(default=0.0, metadata={"help": "std of the initial gate weights (0: exactly uniform)"})
    learn_tau: bool = field(default=True, metadata={"help": "train τ"})

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise MoleError(f"`granularity` must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.gate_input not in GATE_INPUTS:
            raise MoleError(f"`gate_input` must be one of {GATE_INPUTS}, got {self.gate_input!r}")
        if not 0 < self.tau_min <= self.tau_init <= self.tau_max:
            raise MoleError(f"need 0 < tau_min ≤ tau_init ≤ tau_max, got {self.tau_min}, {self.tau_init}, "
                            f"{self.tau_max}")

    def to_dict(self) -> dict:
        return asdict(self)


def rms_normalize(f: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale each row to unit RMS (scale-free features of any width)."""
    return f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)


def pool_input(x: torch.Tensor, is_conv: bool) -> torch.Tensor:
    """Mean over tokens/pixels: conv ``(B, C, H, W)`` → ``(B, C)``; linear ``(B, ..., C)`` → ``(B, C)``."""
    if is_conv:
        return x.mean(dim=tuple(range(2, x.dim())))
    if x.dim() == 2:
        return x
    return x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)


def pool_prompt(context: torch.Tensor) -> torch.Tensor:
    """Max over tokens of the cross-attention context ``(B, L, D)`` → ``(B, D)``.

    The max keeps a concept's trigger token visible (a mean dilutes it among ~77 tokens) and is
    unchanged when a host repeats the context to a longer token length (ComfyUI's rule).
    """
    if context.dim() == 2:
        return context
    return context.reshape(context.shape[0], -1, context.shape[-1]).amax(1)


class ScopeGate(nn.Module):
    """Router of one scope: features ``(B, d)`` → gate probabilities ``(B, N)``."""

    def __init__(self, in_features: int, n_experts: int, cfg: GateConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_experts, in_features) * cfg.init_std)
        self.bias = nn.Parameter(torch.zeros(n_experts))
        self.log_tau = nn.Parameter(torch.tensor(math.log(cfg.tau_init)), requires_grad=cfg.learn_tau)
        self.tau_min, self.tau_max = cfg.tau_min, cfg.tau_max

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(self.tau_min, self.tau_max)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(rms_normalize(features), self.weight, self.bias)
        return torch.softmax(logits / self.tau, dim=-1)


def apply_mask(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masking mode: ``g'_i = m_i g_i / Σ_j m_j g_j`` (drop experts without retraining)."""
    gm = g * mask
    return gm / gm.sum(-1, keepdim=True).clamp_min(1e-12)


def static_gates(mode: str, n: int, mask: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Fixed gate vector ``(1, N)``: uniform = NLA ``1/N_active``; static = user weights (masked)."""
    if mode == "uniform":
        return (mask / mask.sum().clamp_min(1)).reshape(1, n)
    if weights is None:
        raise MoleError("static mode needs `weights` (one per expert)")
    return (weights * mask).reshape(1, n)


def entropy(g: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of gate rows ``(..., N)``."""
    return -(g * g.clamp_min(1e-12).log()).sum(-1)


def balance_loss(gates: list[torch.Tensor], active: torch.Tensor | None = None) -> torch.Tensor:
    """Gating balance loss, paper Eq. 14–15: ``−Σ_i log q_i``.

    ``q_i`` is the mean of expert i's gate over the M gates (scopes) and the batch; only
    active (unmasked) experts count. Minimum ``N log N`` at uniform use. α is applied by the caller.

    Args:
        gates: M tensors ``(B, N)`` from one forward pass, with grad.
        active: bool ``(N,)``; default all.
    """
    if not gates:
        raise MoleError("balance loss needs the gates of a forward pass in gated mode (none recorded)")
    q = torch.stack([g.float().mean(0) for g in gates]).mean(0)
    if active is not None:
        q = q[active.to(q.device)]
    return -q.clamp_min(1e-12).log().sum()
