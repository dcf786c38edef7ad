"""Exact dense deltas of the LyCORIS module kinds, at strength 1, in ComfyUI's conventions.

An expert must mean the same in the CLI as in the nodes, which read LoRA files through ComfyUI's own adapters
(``comfy.weight_adapter``). Kinds and their delta ``ΔW`` (``W`` the layer's base weight, ``s = alpha / rank``
when the file has an alpha, else 1):

- LoHa: ``s · (w1a w1b) ⊙ (w2a w2b)``; with Tucker cores each product is ``t ×₀ w_a ×₁ w_b`` (a k×k core).
- LoKr: ``s · w1 ⊗ w2`` (each factor whole or ``a b``; ``w2`` may have a Tucker core), ``s`` from the
  decomposed factor's rank.
- GLoRA: ``s · (W a1 a2 + b1 b2)`` (``s = alpha / rank``); the old LyCORIS layout is
  ``b2 b1 + W a2 a1`` (told apart by the factors' shapes, as ComfyUI does).
- OFT: ``(R − I)ᵀ W`` per block of output rows, ``R = (I + Q)(I − Q)⁻¹`` the Cayley map of the skew part
  ``Q`` of each block, its norm clamped to ``alpha`` when ``alpha > 0``. (ComfyUI reads ``rescale`` but does
  not use it for OFT; neither do we.)
- BOFT: the butterfly product of such rotations applied to ``W``, times ``rescale``, minus ``W``.
- DoRA (``dora_scale`` beside a LoRA, LoHa, LoKr or GLoRA module): ``W' − W`` with
  ``W' = m · (W + ΔW) / ‖·‖`` (see :func:`decompose`).

GLoRA, OFT, BOFT and DoRA depend on ``W``: they are kept as a :class:`WeightDependent` until the expert is
attached to a layer. A gate or strength scales the strength-1 delta linearly, as the nodes do; ComfyUI's
``LoraLoader`` agrees at every strength except for OFT and BOFT, whose strength acts inside the rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import MoleError

WEIGHT_KINDS = ("GLoRA", "OFT", "BOFT")  # kinds whose delta depends on the base weight even without DoRA


def module_kind(roles: dict[str, torch.Tensor]) -> str | None:
    """The adapter kind of a module's tensors (``LoRA``, ``LoHa``, ``LoKr``, ``GLoRA``, ``OFT``, ``BOFT``,
    ``diff``), or None when it has none of their parts."""
    if "down" in roles or "up" in roles:
        return "LoRA"
    if "hada_w1_a" in roles:
        return "LoHa"
    if roles.keys() & {"lokr_w1", "lokr_w1_a"}:
        return "LoKr"
    if "a1" in roles:
        return "GLoRA"
    if "oft_blocks" in roles:
        return "OFT" if roles["oft_blocks"].dim() == 3 else "BOFT"
    if "diff" in roles:
        return "diff"
    return None


def lora_down(roles: dict[str, torch.Tensor]) -> torch.Tensor:
    """A LoRA module's ``down``; the LoCon Tucker form (1×1 ``down`` then k×k ``mid``) as the one k×k conv of
    rank r it equals."""
    down = roles["down"]
    if "mid" not in roles:
        return down
    return torch.einsum("rshw,sc->rchw", roles["mid"].float(), down.float().flatten(1))


def _alpha(roles: dict[str, torch.Tensor]) -> float | None:
    a = roles.get("alpha")
    return None if a is None else float(a.float().reshape(()))


def _rank_scale(roles: dict[str, torch.Tensor], rank: int) -> float:
    a = _alpha(roles)
    return 1.0 if a is None else a / rank


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS CP form: core ``(r_a, r_b, kh, kw)``, ``a (r_a, out)``, ``b (r_b, in)`` → ``(out, in, kh, kw)``."""
    return torch.einsum("abhw,bi,ao->oihw", core.float(), b.float(), a.float()).contiguous()


def loha_delta(roles: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """LoHa ``(w1a w1b) ⊙ (w2a w2b)`` (or the Tucker form) and its scale."""
    parts = []
    for i in (1, 2):
        a, b = roles[f"hada_w{i}_a"], roles[f"hada_w{i}_b"]
        core = roles.get(f"hada_t{i}")
        parts.append(_tucker(core, a, b) if core is not None else a.float() @ b.float())
    return parts[0] * parts[1], _rank_scale(roles, int(roles["hada_w1_b"].shape[0]))


def lokr_delta(roles: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """LoKr ``w1 ⊗ w2`` (factors whole, ``a b``, or ``w2`` with a Tucker core) and its scale."""
    rank = None
    if "lokr_w1" in roles:
        w1 = roles["lokr_w1"].float()
    else:
        w1, rank = roles["lokr_w1_a"].float() @ roles["lokr_w1_b"].float(), int(roles["lokr_w1_b"].shape[0])
    if "lokr_w2" in roles:
        w2 = roles["lokr_w2"].float()
    else:
        a, b = roles["lokr_w2_a"], roles["lokr_w2_b"]
        w2 = _tucker(roles["lokr_t2"], a, b) if "lokr_t2" in roles else a.float() @ b.float()
        rank = int(b.shape[0])
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2), (1.0 if rank is None else _rank_scale(roles, rank))


def glora_delta(roles: dict[str, torch.Tensor], weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """GLoRA ``W a1 a2 + b1 b2`` (or the old layout ``b2 b1 + W a2 a1``) and its scale ``alpha / rank``."""
    a1, a2, b1, b2 = (roles[k].float().flatten(1) for k in ("a1", "a2", "b1", "b2"))
    w = weight.float()
    old = b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1]
    new = b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0]
    if old and new and not (a2.shape[0] == w.shape[0] == w.shape[1]):
        old = False
    if old:
        delta = (b2 @ b1 + w.flatten(1) @ a2 @ a1).reshape(w.shape)
        rank = a1.shape[0]
    else:
        # the input-channel axis of W is contracted with a1 then a2 (a conv keeps its kernel axes)
        wa = torch.einsum("oi...,ij->oj...", w, a1)
        delta = torch.einsum("oj...,jk->ok...", wa, a2).reshape(w.shape) + (b1 @ b2).reshape(w.shape)
        rank = a2.shape[0]
    return delta, _rank_scale(roles, int(rank))


def _cayley(blocks: torch.Tensor, alpha: float) -> torch.Tensor:
    """Orthogonal ``(I + Q)(I − Q)⁻¹`` of the skew parts ``Q = B − Bᵀ`` of ``blocks (..., b, b)``; the whole
    ``Q``'s Frobenius norm is clamped to ``alpha`` when ``alpha > 0`` (OFT's constraint)."""
    q = blocks.float() - blocks.float().transpose(-1, -2)
    if alpha > 0:
        norm = q.norm() + 1e-8
        if norm > alpha:
            q = q * (alpha / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def oft_delta(roles: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """OFT: each block ``k`` of ``b`` output rows of ``W`` becomes ``R_kᵀ W_k``; the delta ``(R − I)ᵀ W``."""
    blocks = roles["oft_blocks"]
    n, b = int(blocks.shape[0]), int(blocks.shape[1])
    r = _cayley(blocks, _alpha(roles) or 0.0) - torch.eye(b)
    w = weight.float().reshape(n, b, -1)
    return torch.einsum("knm,knx->kmx", r, w).reshape(weight.shape)


def boft_delta(roles: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """BOFT: ``m`` butterfly stages, stage ``i`` rotating blocks of ``b`` rows gathered with stride
    ``2^i · b/2``; the result times ``rescale``, minus ``W``."""
    blocks = roles["oft_blocks"]
    stages, b = int(blocks.shape[0]), int(blocks.shape[2])
    alpha = _alpha(roles)
    if alpha is None:
        raise MoleError("BOFT module has no alpha (ComfyUI needs its constraint)")
    r = _cayley(blocks, alpha)
    w = weight.float()
    x = w
    for i in range(stages):
        k = 2 ** i * (b // 2)
        # rows in groups of 2k: interleave the two halves so each block of b rows pairs rows k apart
        x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        x = torch.einsum("bij,bj...->bi...", r[i], x)
        x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    if "rescale" in roles:
        x = x * roles["rescale"].float()
    return x - w


def decompose(delta: torch.Tensor, magnitude: torch.Tensor, weight: torch.Tensor, where: str) -> torch.Tensor:
    """DoRA at strength 1 (ComfyUI's ``weight_decompose``): ``W' = m · (W + ΔW) / ‖·‖`` with the norm taken per
    output row of ``W`` when ``m`` is on the output axis, per input column of ``W + ΔW`` otherwise; returns
    ``W' − W``."""
    w = weight.float()
    calc = w + delta.reshape(w.shape)
    m = magnitude.float()
    ones = [1] * (w.dim() - 1)
    if tuple(m.shape) == (w.shape[0], *ones):  # output axis: the norm of W's rows, as ComfyUI takes it
        norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(m.shape)
    elif tuple(m.shape) == (1, w.shape[1], *ones[1:]):  # input axis: the norm of (W + ΔW)'s columns
        norm = calc.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(m.shape)
    else:
        raise MoleError(f"{where}: DoRA magnitude {tuple(m.shape)} fits neither axis of the layer weight "
                        f"{tuple(w.shape)}")
    return calc * (m / (norm + torch.finfo(torch.float32).eps)) - w


def scaled_delta(kind: str, roles: dict[str, torch.Tensor], weight: torch.Tensor | None) -> torch.Tensor:
    """``s · ΔW`` of one module at strength 1, before any DoRA (``weight`` needed for GLoRA, OFT, BOFT)."""
    if kind == "diff":
        return roles["diff"].float()
    if kind == "LoRA":
        down, up = lora_down(roles).float(), roles["up"].float()
        d = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        return d * _rank_scale(roles, int(roles["up"].shape[1]))
    if kind in ("OFT", "BOFT"):
        return (oft_delta if kind == "OFT" else boft_delta)(roles, weight)
    if kind == "GLoRA":
        delta, scale = glora_delta(roles, weight)
    else:
        delta, scale = (loha_delta if kind == "LoHa" else lokr_delta)(roles)
    return delta * scale


@dataclass(frozen=True, eq=False)  # tensors inside: compared by identity
class WeightDependent:
    """A module whose delta depends on the layer's base weight (GLoRA, OFT, BOFT, anything with DoRA):
    its tensors, kept until the expert is attached (see :meth:`delta`)."""

    kind: str
    roles: dict[str, torch.Tensor]

    @property
    def label(self) -> str:
        return f"DoRA ({self.kind})" if "dora_scale" in self.roles else self.kind

    def delta(self, weight: torch.Tensor, where: str) -> torch.Tensor:
        """The exact strength-1 delta ``W' − W`` on a layer of base ``weight`` (fp32, the weight's shape)."""
        w = weight.detach().float().cpu()
        try:
            d = scaled_delta(self.kind, self.roles, w)
            if d.numel() != w.numel():
                raise MoleError(f"{where}: {self.label} module gives a {tuple(d.shape)} delta but the layer weight "
                                f"is {tuple(w.shape)}")
            d = d.reshape(w.shape)
            if "dora_scale" in self.roles:
                d = decompose(d, self.roles["dora_scale"], w, where)
        except (RuntimeError, ValueError, IndexError) as exc:  # parts that do not fit the layer or each other
            raise MoleError(f"{where}: {self.label} module does not fit the layer weight {tuple(w.shape)} "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        if not torch.isfinite(d).all():
            raise MoleError(f"{where}: {self.label} module gives a non-finite delta")
        return d
