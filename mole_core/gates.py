"""Gating functions: one small router per scope, in two families.

``softmax`` (the paper, Eq. 9–11): ``g = softmax((W f + b) / τ)`` with ``f`` a pooled, RMS-normalised
feature vector, so the gate works at any resolution and token count. ``W`` starts at zero (or noise of
``init_std``) and ``b`` at 0, hence training starts at uniform mixing (1/N each) — the NLA baseline.
τ is learnable, kept in ``[tau_min, tau_max]`` by a clamp.

``sigmoid``: ``g_i = m · σ((W f + b)_i / τ)`` with a learnable per-scope magnitude ``m = m_max · σ(ρ)``
in ``[0, m_max]``. Each expert is switched on or off on its own, so a prompt that names two concepts can
run both LoRAs at full strength and a prompt that names none can run none — two things no convex mixture
can express (its gates always sum to 1). Training starts at ``g_i = init_gate`` for every expert.

``gate_input="router"``: one :class:`PromptRouter` reads the first text-encoder layer's token states (where a
trigger word is the same vector in every prompt) and gives one logit per expert and prompt; every scope, in
the text encoders and the UNet, adds that logit to its own bias and applies its own τ (and magnitude). The
scopes then have no features of their own (feature size 0): the routing decision is made once per prompt.

``gate_input="trigger"`` (sigmoid family): one :class:`TriggerRouter` on the text encoder's **token embeddings**
(no position, no context: a word is the same vector wherever it stands) compares every token with each
expert's *trigger key* (the embedding of the word its LoRA is named after, fixed when training starts) and
gives ``s_i · max_t cos(e_t − c, k_i) + b_i``: a LoRA switches on when its trigger word, and only a word that
close to it, appears. Every scope then only *scales*: ``g_i = m_i · σ(logit_i)`` with a learnable magnitude per
scope and expert and no bias of its own, so no scope can run a LoRA for a prompt that does not name it. A learned
linear router (``router``) fits the training prompts' words and fires on unseen ones; fixed keys do not.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .errors import MoleError
from .naming import GRANULARITIES

GATE_INPUTS = ("input", "experts", "prompt", "router", "trigger")
ROUTED_INPUTS = ("router", "trigger")  # one router per prompt; the scopes read its logits
FAMILIES = ("softmax", "sigmoid")
TEXT_POOLS = ("mean", "max", "tokens")
NEGATIVE_ROUTING = ("own", "positive")
MODES = ("gated", "uniform", "static")


@dataclass
class GateConfig:
    """How gates are shaped (stored in gate files)."""

    granularity: str = field(default="block", metadata={"help": "matrix | layer | block | network"})
    gate_input: str = field(default="input", metadata={"help": "input: pooled scope input; "
                                                       "experts: pooled normalised expert outputs; "
                                                       "prompt: max-pooled prompt conditioning (UNet scopes); "
                                                       "router: one router on the first text-encoder layer's "
                                                       "tokens decides per prompt for every scope; "
                                                       "trigger: each LoRA on when its trigger word is in the "
                                                       "prompt, every scope scales each LoRA (sigmoid family)"})
    tau_init: float = field(default=1.0, metadata={"help": "initial softmax temperature"})
    tau_min: float = field(default=0.05, metadata={"help": "lower clamp of τ"})
    tau_max: float = field(default=10.0, metadata={"help": "upper clamp of τ"})
    init_std: float = field(default=0.0, metadata={"help": "std of the initial gate weights (0: exactly uniform)"})
    learn_tau: bool = field(default=True, metadata={"help": "train τ"})
    family: str = field(default="softmax", metadata={"help": "softmax: the paper's convex mixture (gates sum "
                                                     "to 1); sigmoid: each expert on/off on its own, times a "
                                                     "learnable per-scope magnitude in [0, m_max]"})
    m_max: float = field(default=2.0, metadata={"help": "sigmoid family: upper bound of the per-scope magnitude"})
    init_gate: float = field(default=0.5, metadata={"help": "sigmoid family: every expert's gate at the start"})
    text_pool: str = field(default="mean", metadata={"help": "how text-encoder scopes pool their token states: "
                                                     "mean | max (max keeps a trigger word visible) | tokens "
                                                     "(score every token, keep each expert's largest logit)"})
    token_routing: bool = field(default=False, metadata={"help": "prompt-reading gates (UNet 'prompt', text "
                                                         "encoders) score every token and keep each expert's "
                                                         "largest logit, instead of scoring pooled features"})
    negative_routing: str = field(default="own", metadata={"help": "routed gates (router, trigger) under "
                                                           "classifier-free guidance: own — the negative prompt's "
                                                           "UNet rows route by the negative prompt (a LoRA the "
                                                           "prompt names runs in one branch only, its effect "
                                                           "scaled by the CFG scale); positive — they take the "
                                                           "routes of their prompt's rows (the LoRAs the prompt "
                                                           "names run in both branches, as loaded LoRAs do)"})

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise MoleError(f"`granularity` must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.gate_input not in GATE_INPUTS:
            raise MoleError(f"`gate_input` must be one of {GATE_INPUTS}, got {self.gate_input!r}")
        if not 1e-3 <= self.tau_min <= self.tau_init <= self.tau_max <= 1e3:  # a tinier τ overflows to NaN gates
            raise MoleError(f"need 0.001 ≤ tau_min ≤ tau_init ≤ tau_max ≤ 1000, got {self.tau_min}, {self.tau_init}, "
                            f"{self.tau_max}")
        if self.family not in FAMILIES:
            raise MoleError(f"gate `family` must be one of {FAMILIES}, got {self.family!r}")
        if self.gate_input == "trigger" and self.family != "sigmoid":
            raise MoleError("gate_input 'trigger' needs the sigmoid gate family (each LoRA on or off by its word)")
        if self.text_pool not in TEXT_POOLS:
            raise MoleError(f"`text_pool` must be one of {TEXT_POOLS}, got {self.text_pool!r}")
        if self.negative_routing not in NEGATIVE_ROUTING:
            raise MoleError(f"`negative_routing` must be one of {NEGATIVE_ROUTING}, got {self.negative_routing!r}")
        if not (0 < self.m_max < 1e3 and 0 < self.init_gate < self.m_max):
            raise MoleError(f"need 0 < init_gate < m_max (≤ 1000), got init_gate {self.init_gate}, "
                            f"m_max {self.m_max}")

    @property
    def routed(self) -> bool:
        """Whether one router decides per prompt and the scopes read its logits (feature size 0)."""
        return self.gate_input in ROUTED_INPUTS

    @property
    def convex(self) -> bool:
        """Whether gate rows sum to 1 (softmax family): masking renormalises, the balance loss applies."""
        return self.family == "softmax"

    def to_dict(self) -> dict:
        return asdict(self)


def rms_normalize(f: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale each row to unit RMS (scale-free features of any width)."""
    return f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)


def pool_input(x: torch.Tensor, is_conv: bool, how: str = "mean") -> torch.Tensor:
    """Pool over tokens/pixels: conv ``(B, C, H, W)`` → ``(B, C)``; linear ``(B, ..., C)`` → ``(B, C)``.

    ``how="max"`` (token states only) keeps one token's feature visible among many; ``how="tokens"``
    returns the token states ``(B, L, C)`` unpooled (for :class:`ScopeGate`'s token routing)."""
    if is_conv:
        return x.mean(dim=tuple(range(2, x.dim())))
    if x.dim() == 2:
        return x
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    if how == "tokens":
        return tokens
    return tokens.amax(1) if how == "max" else tokens.mean(1)


def pool_prompt(context: torch.Tensor) -> torch.Tensor:
    """Max over tokens of the cross-attention context ``(B, L, D)`` → ``(B, D)``.

    The max keeps a concept's trigger token visible (a mean dilutes it among ~77 tokens) and is
    unchanged when a host repeats the context to a longer token length (ComfyUI's rule).
    """
    if context.dim() == 2:
        return context
    return context.reshape(context.shape[0], -1, context.shape[-1]).amax(1)


class ScopeGate(nn.Module):
    """Router of one scope: features ``(B, d)`` → gates ``(B, N)`` (softmax rows, or sigmoid × magnitude)."""

    def __init__(self, in_features: int, n_experts: int, cfg: GateConfig):
        super().__init__()
        self.family = cfg.family
        self.weight = nn.Parameter(torch.randn(n_experts, in_features) * cfg.init_std)
        self.bias = nn.Parameter(torch.zeros(n_experts))
        self.log_tau = nn.Parameter(torch.tensor(math.log(cfg.tau_init)), requires_grad=cfg.learn_tau)
        self.tau_min, self.tau_max = cfg.tau_min, cfg.tau_max
        self.m_max = cfg.m_max
        # subtracted from the features before normalising (0 = none): set from the training prompts'
        # mean feature, so the router weights see only what differs between prompts
        self.register_buffer("center", torch.zeros(in_features))
        if cfg.gate_input == "trigger":  # the router decides on/off; the scope scales each expert, nothing else
            m0 = 1.0 if 1.0 < cfg.m_max else cfg.m_max / 2
            self.magnitude_logit = nn.Parameter(torch.full((n_experts,), _logit(m0 / cfg.m_max)))
            self.bias.requires_grad_(False)
            self.log_tau.requires_grad_(False)
            # per-set scales (block search by set): row k of ``sets`` is an on-pattern of the experts (0/1), row k
            # of ``set_scale`` each expert's factor when exactly that pattern is on; none (K = 0) by default
            self.register_buffer("sets", torch.zeros(0, n_experts))
            self.register_buffer("set_scale", torch.ones(0, n_experts))
        elif self.family == "sigmoid":
            # the magnitude starts at 1 (LoRA strength 1 when fully on) if init_gate < 1 < m_max, else midway
            # between init_gate and m_max; the bias then sets σ(b/τ)·m = init_gate exactly
            m0 = 1.0 if cfg.init_gate < 1.0 < cfg.m_max else (cfg.init_gate + cfg.m_max) / 2
            self.magnitude_logit = nn.Parameter(torch.tensor(_logit(m0 / cfg.m_max)))
            with torch.no_grad():
                self.bias.fill_(_logit(cfg.init_gate / m0) * cfg.tau_init)

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(self.tau_min, self.tau_max)

    @property
    def magnitude(self) -> torch.Tensor:
        """Per-scope magnitude ``m_max · σ(ρ)`` (sigmoid family, one per expert with gate_input trigger;
        1 for softmax)."""
        if self.family != "sigmoid":
            return torch.ones((), device=self.weight.device)
        return self.m_max * torch.sigmoid(self.magnitude_logit)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, d)`` pooled features, or ``(B, L, d)`` tokens: then every token is scored and the largest
        logit per expert wins (token routing: one trigger word anywhere can switch its LoRA on).

        ``mask`` ``(N,)`` of 0/1 (masking mode): softmax gates renormalise over the experts that are on
        (``−inf`` logits for the others, exactly :func:`apply_mask`), sigmoid gates are zeroed. An all-on
        mask changes nothing bit for bit, so hosts pass it always and torch.compile never guards on it.

        A scope of a shared router (feature size 0) takes the router's logits ``(B, N)`` as ``features``
        and adds its own bias."""
        if self.weight.shape[1] == 0:
            logits = features + self.bias
        else:
            logits = torch.nn.functional.linear(rms_normalize(features - self.center), self.weight, self.bias)
        if logits.dim() == 3:
            logits = logits.amax(1)
        if self.family == "softmax":
            z = logits / self.tau
            if mask is not None:
                z = z + torch.log(mask)  # log 1 = 0 exactly; log 0 = −inf
            return torch.softmax(z, dim=-1)
        g = gate_values(logits, self.tau, self.family, self.magnitude_logit, self.m_max)
        if mask is not None:
            g = g * mask
        if self.has_set_scales:
            on = torch.sigmoid(logits / self.tau) * (1 if mask is None else mask)
            g = g * set_factors(on, self.sets, self.set_scale)
        return g

    @property
    def has_set_scales(self) -> bool:
        """Whether the gate holds per-set scales (a trigger gate with K ≥ 1 rows)."""
        sets = getattr(self, "sets", None)
        return sets is not None and sets.shape[0] > 0

    @torch.no_grad()
    def set_set_scales(self, sets: torch.Tensor, scale: torch.Tensor) -> None:
        """Store per-set scales: ``sets`` ``(K, N)`` of 0/1 on-patterns, ``scale`` ``(K, N)`` each expert's factor
        under that pattern (K = 0: none). Trigger gates only."""
        if not hasattr(self, "sets"):
            raise MoleError("per-set scales need gate_input trigger")
        if sets.shape != scale.shape or sets.dim() != 2 or sets.shape[1] != self.sets.shape[1]:
            raise MoleError(f"per-set scales: sets {tuple(sets.shape)} and scale {tuple(scale.shape)} must both be "
                            f"(K, {self.sets.shape[1]})")
        self.sets = sets.to(self.sets.device, torch.float32).clone()
        self.set_scale = scale.to(self.set_scale.device, torch.float32).clone()


class PromptRouter(nn.Module):
    """The shared router of ``gate_input="router"``: token states ``(B, L, d)`` of the first text-encoder
    layer → one logit per expert ``(B, N)``: ``log mean_t exp(W · rms(f_t − c))``, a soft maximum over tokens
    (a trigger word anywhere in the prompt can switch its LoRA on). Not the hard maximum: the tokens every
    prompt shares (start token, padding) would win it for every prompt alike, and their gradients from prompts
    that name a concept and prompts that do not cancel — the router would never see the trigger word.
    ``W`` starts at ``init_std`` noise (0: every logit 0, so every scope starts at its prior gate)."""

    def __init__(self, in_features: int, n_experts: int, cfg: GateConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_experts, in_features) * cfg.init_std)
        self.register_buffer("center", torch.zeros(in_features))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(rms_normalize(tokens - self.center), self.weight)
        if logits.dim() == 2:
            return logits
        return torch.logsumexp(logits, dim=1) - math.log(logits.shape[1])


class TriggerRouter(nn.Module):
    """The shared router of ``gate_input="trigger"``: token embeddings ``(B, L, d)`` → one logit per expert
    ``(B, N)``: ``scale_i · max_t cos(e_t − center, key_i) + bias_i``.

    ``weight`` holds the unit trigger keys (fixed; a zero row for an expert without a trigger word, whose logit
    is then its bias alone) and ``center`` the mean embedding of the distinct tokens of the training prompts
    (padding, repeated in every prompt, would otherwise dominate it). Only ``scale`` and ``bias`` train: the
    threshold between "this word" and "any other word"."""

    def __init__(self, in_features: int, n_experts: int, cfg: GateConfig, scale: float = 10.0,
                 threshold: float = 0.5):
        super().__init__()
        self.register_buffer("weight", torch.zeros(n_experts, in_features))
        self.register_buffer("center", torch.zeros(in_features))
        self.scale = nn.Parameter(torch.full((n_experts,), scale))
        self.bias = nn.Parameter(torch.zeros(n_experts))
        self.threshold = threshold

    @torch.no_grad()
    def set_keys(self, keys: torch.Tensor) -> None:
        """Trigger embeddings ``(N, d)`` (a zero row: no trigger) → unit keys; a keyed expert's bias starts at
        ``−scale · threshold`` (on above that cosine), a keyless one's at 0 (its gate at half magnitude)."""
        centred = torch.where(keys.abs().sum(-1, keepdim=True) > 0, keys - self.center, torch.zeros_like(keys))
        self.weight.copy_(torch.nn.functional.normalize(centred, dim=-1))
        keyed = self.weight.abs().sum(-1) > 0
        self.bias.copy_(torch.where(keyed, -self.scale * self.threshold, torch.zeros_like(self.bias)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens if tokens.dim() == 3 else tokens[:, None]
        cos = torch.nn.functional.normalize(x - self.center, dim=-1) @ self.weight.T  # (B, L, N)
        return cos.amax(1) * self.scale + self.bias


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def gate_values(logits: torch.Tensor, tau: torch.Tensor, family: str, magnitude_logit: torch.Tensor | None = None,
                m_max: float = 1.0) -> torch.Tensor:
    """Gates from router logits ``(..., N)``: ``softmax(z/τ)`` or ``m_max σ(ρ) · σ(z/τ)``."""
    if family == "softmax":
        return torch.softmax(logits / tau, dim=-1)
    if magnitude_logit is None:
        raise MoleError("sigmoid gates need a magnitude")
    return torch.sigmoid(logits / tau) * (m_max * torch.sigmoid(magnitude_logit))


def set_factors(on: torch.Tensor, sets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-set scale factors ``(B, N)`` for on-probabilities ``on`` ``(B, N)``: ``1 + Σ_k w_k (scale_k − 1)`` with
    ``w_k = Π_j (on_j if sets_kj else 1 − on_j)``, the probability that exactly pattern k is on (the experts
    switch on independently). A prompt whose pattern is no row keeps factor 1; a crisp pattern k gets ``scale_k``.
    Multilinear in ``on``: between crisp patterns it interpolates, never jumps."""
    on = on[:, None, :]  # (B, 1, N)
    w = torch.where(sets.bool(), on, 1 - on).prod(-1)  # (B, K)
    return 1 + w @ (scale - 1)


def prior_gates(tensors: dict[str, torch.Tensor], scopes: list[str], cfg: GateConfig) -> dict[str, list[float]]:
    """Gate of each scope for a neutral (zero) feature: the routers' biases alone (``g(0)``)."""
    out = {}
    for scope in scopes:
        bias = tensors[f"gates.{scope}.bias"].float()
        tau = tensors[f"gates.{scope}.log_tau"].float().exp().clamp(cfg.tau_min, cfg.tau_max)
        mag = tensors.get(f"gates.{scope}.magnitude_logit")
        out[scope] = gate_values(bias, tau, cfg.family, None if mag is None else mag.float(), cfg.m_max).tolist()
    return out


def apply_mask(g: torch.Tensor, mask: torch.Tensor, convex: bool = True) -> torch.Tensor:
    """Masking mode: ``g'_i = m_i g_i / Σ_j m_j g_j`` (drop experts without retraining).

    Non-convex gates (sigmoid family) are only zeroed: each expert's gate stands on its own."""
    gm = g * mask
    if not convex:
        return gm
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


def share_entropy(g: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row's shares ``g / Σ g`` (equals :func:`entropy` on softmax rows up to
    rounding; defined for sigmoid gates, whose rows do not sum to 1)."""
    return entropy(g / g.sum(-1, keepdim=True).clamp_min(1e-12))


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
