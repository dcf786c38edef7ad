"""Stacked expert banks: all experts of one target layer as one rank-R LoRA.

``A_cat (R, in[, kh, kw])`` and ``B_cat (out, R[, 1, 1])`` concatenate the experts along the
rank axis (ragged ranks welcome, R = Σ r_i); each expert's ``alpha / r`` is folded into its
columns of ``B_cat``; ``seg (R,)`` says which expert owns each rank row. Per-sample gates
scale the rank rows, so mixing N experts costs two GEMMs (Linear) or a conv plus a 1×1 conv
(Conv) — the FLOPs of one LoRA of rank R, with no Python loop over experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MoleError
from .expert import LoraFactor, factor_from_delta


@dataclass(frozen=True)
class ConvSpec:
    """Geometry of the base conv that the ``A_cat`` conv must share."""

    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]


def layer_shape(module: nn.Module) -> tuple[int, int, tuple[int, int] | None, ConvSpec | None]:
    """``(in, out, kernel, conv spec)`` of a Linear or Conv2d (including ComfyUI's op subclasses)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, None, None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise MoleError(f"conv layer with groups={module.groups}, padding_mode={module.padding_mode!r} "
                            "is not supported as a LoRA target")
        spec = ConvSpec(tuple(module.stride), module.padding if isinstance(module.padding, str)
                        else tuple(module.padding), tuple(module.dilation))
        return module.in_channels, module.out_channels, tuple(module.kernel_size), spec  # type: ignore[return-value]
    raise MoleError(f"LoRA targets must be Linear or Conv2d layers, got {type(module).__name__}")


def fit_factor(f: LoraFactor, in_dim: int, out_dim: int, kernel: tuple[int, int] | None,
               where: str) -> LoraFactor:
    """Reshape a factor to the layer's kind (Linear ↔ 1×1 conv) and check every dimension."""
    down, up = f.down, f.up
    if f.dense and kernel is not None and down.dim() == 2:  # dense 2-D delta meant for a conv
        delta = f.delta().reshape(out_dim, in_dim, *kernel)
        return fit_factor(factor_from_delta(delta), in_dim, out_dim, kernel, where)
    if kernel is None and down.dim() == 4:
        if down.shape[2:] != (1, 1):
            raise MoleError(f"{where}: conv LoRA with kernel {tuple(down.shape[2:])} on a Linear layer")
        down, up = down.flatten(1), up.flatten(1)
    elif kernel is not None and down.dim() == 2:
        if kernel != (1, 1):
            raise MoleError(f"{where}: Linear LoRA on a {kernel[0]}×{kernel[1]} conv layer")
        down, up = down[:, :, None, None], up[:, :, None, None]
    got_in = down.shape[1]
    if got_in != in_dim or up.shape[0] != out_dim:
        raise MoleError(f"{where}: LoRA is {got_in}→{up.shape[0]} but the model layer is {in_dim}→{out_dim}")
    if kernel is not None and tuple(down.shape[2:]) != kernel:
        raise MoleError(f"{where}: LoRA kernel {tuple(down.shape[2:])} ≠ layer kernel {kernel}")
    if kernel is not None and tuple(up.shape[2:]) != (1, 1):
        raise MoleError(f"{where}: LoRA up must be a 1×1 conv, got kernel {tuple(up.shape[2:])}")
    return LoraFactor(down=down, up=up, alpha=f.alpha, scale_override=f.scale_override, dense=f.dense)


def _resolved(f: LoraFactor, module: nn.Module, where: str) -> LoraFactor:
    """A factor whose delta depends on the layer's weight (GLoRA, OFT, BOFT, DoRA) as the exact dense factor it
    makes on ``module``; any other factor unchanged."""
    return f if f.pending is None else factor_from_delta(f.pending.delta(module.weight, where))


class ExpertBank:
    """All experts of one target layer, stacked along the rank axis.

    Semantics (plain torch; ``coef (B, R)`` already holds gate × strength × λ per rank row)::

        h = x @ A_cat.T                      # (B, ..., R)   shrink
        y = (h * coef[:, seg]) @ B_cat.T     # (B, ..., out) expand
    """

    def __init__(self, target: str, members: list[tuple[int, LoraFactor]], module: nn.Module):
        if not members:
            raise MoleError(f"{target}: an expert bank needs at least one expert")
        self.target = target
        in_dim, out_dim, kernel, conv = layer_shape(module)
        fitted = [(i, fit_factor(_resolved(f, module, target), in_dim, out_dim, kernel, target)) for i, f in members]
        self.in_dim, self.out_dim, self.kernel, self.conv = in_dim, out_dim, kernel, conv
        self.experts = [i for i, _ in fitted]
        self.a_cat = torch.cat([f.down.float() for _, f in fitted], 0)
        self.b_cat = torch.cat([f.up.float() * f.scale for _, f in fitted], 1)
        self.seg = torch.cat([torch.full((f.rank,), i, dtype=torch.long) for i, f in fitted])
        self.rank = int(self.seg.numel())
        # experts and their ranks: targets with the same layout share one coefficient tensor per forward
        self.layout = tuple((i, f.rank) for i, f in fitted)
        offsets = [0]
        for _, f in fitted:
            offsets.append(offsets[-1] + f.rank)
        self._spans = {i: (offsets[k], offsets[k + 1]) for k, (i, _) in enumerate(fitted)}  # Python ints: no syncs
        self._cache: dict[tuple, object] = {}

    @property
    def is_conv(self) -> bool:
        return self.kernel is not None

    def tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A_cat, B_cat, seg)`` on a device/dtype, copied once and cached."""
        key = (device, dtype)
        hit = self._cache.get(key)
        if hit is None:
            hit = (self.a_cat.to(device=device, dtype=dtype), self.b_cat.to(device=device, dtype=dtype),
                   self.seg.to(device))
            self._cache[key] = hit
        return hit

    def clear_cache(self) -> None:
        self._cache.clear()

    def shrink(self, x: torch.Tensor) -> torch.Tensor:
        """``h = x A_catᵀ``: Linear ``(B, ..., R)``; Conv ``(B, R, H', W')``."""
        a, _, _ = self.tensors(x.device, x.dtype)
        if self.conv is None:
            return F.linear(x, a)
        return F.conv2d(x, a, None, self.conv.stride, self.conv.padding, self.conv.dilation)

    def expand(self, h: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """``(h · coef) B_catᵀ`` with ``coef (B, R)`` or ``(1, R)`` broadcast over tokens/pixels."""
        _, b, _ = self.tensors(h.device, h.dtype)
        coef = coef.to(h.dtype)
        if self.conv is None:
            coef = _match_batch(coef, h.shape[0], self.target)
            coef = coef.reshape(coef.shape[0], *([1] * (h.dim() - 2)), coef.shape[-1])
            return F.linear(h * coef, b)
        coef = _match_batch(coef, h.shape[0], self.target)[:, :, None, None]
        return F.conv2d(h * coef, b)

    def add_one(self, out: torch.Tensor, x: torch.Tensor, expert: int, scale: float) -> torch.Tensor:
        """``out + scale · B_e A_e x`` with only expert ``expert``'s rank rows (its slice of the bank): a single
        LoRA's cost, for LoRA Switch. ``out`` unchanged when the expert has no factor on this layer."""
        span = self._spans.get(expert)
        if span is None:
            return out
        a, b, _ = self.tensors(x.device, x.dtype)
        lo, hi = span
        if self.conv is None:
            return _add_linear(out, F.linear(x, a[lo:hi]), b[:, lo:hi].t(), scale)
        h = F.conv2d(x, a[lo:hi], None, self.conv.stride, self.conv.padding, self.conv.dilation)
        return out + scale * F.conv2d(h, b[:, lo:hi])

    def row_coefficients(self, gates: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-rank-row coefficients ``(B, 1…, R)`` from gates ``(B, N)`` and per-expert scales ``(N,)``, in
        ``like``'s dtype and shaped to broadcast over its tokens/pixels (``like`` = the shrunk activations);
        compute once per forward for every target of a scope with this bank's :attr:`layout`."""
        _, _, seg = self.tensors(like.device, like.dtype)
        coef = (gates if gates.device == like.device else gates.to(like.device)) * scale
        coef = coef[:, seg] if coef.dtype == like.dtype else coef[:, seg].to(like.dtype)
        coef = _match_batch(coef, like.shape[0], self.target)
        if self.conv is not None:
            return coef[:, :, None, None]
        return coef.reshape(coef.shape[0], *([1] * (like.dim() - 2)), coef.shape[-1])

    def expand_add_rows(self, out: torch.Tensor, h: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """``out + expand(h, ·)`` with coefficients already from :meth:`row_coefficients`: one multiply and one
        fused GEMM per layer (views are free)."""
        hc = h * coef
        if self.conv is None:
            return _add_linear(out, hc, self.up_t(h.device, h.dtype))
        _, b, _ = self.tensors(h.device, h.dtype)
        return torch.baddbmm(out.flatten(2), b.flatten(1).expand(h.shape[0], -1, -1), hc.flatten(2)).reshape(out.shape)

    def up_t(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``B_catᵀ`` (Linear banks), cached next to the bank's other tensors."""
        key = ("up_t", device, dtype)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self.tensors(device, dtype)[1].t()
        return hit

    def scaled_up(self, coef: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``B_cat`` with fixed per-rank-row coefficients ``(R,)`` folded in, transposed for :meth:`add_fixed`
        (Linear ``(R, out)``; Conv ``(out, R, 1, 1)``)."""
        _, b, _ = self.tensors(device, dtype)
        if self.conv is None:
            return (b * coef.to(device, dtype)[None, :]).t().contiguous()
        return b * coef.to(device, dtype)[None, :, None, None]

    def add_fixed(self, out: torch.Tensor, x: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``out + up(A_cat x)`` with ``up`` from :meth:`scaled_up`: fixed weights cost a plain rank-R LoRA."""
        h = self.shrink(x)
        if self.conv is None:
            return _add_linear(out, h, up)
        return out + F.conv2d(h, up)

    def pooled_expert_outputs(self, h: torch.Tensor, n_experts: int) -> torch.Tensor:
        """Mean over tokens/pixels of every expert's output, ``(B, N, out)`` (paper Eq. 9).

        Uses ``mean_L(B_i A_i x) = B_i mean_L(A_i x)``: only the rank-R activations are pooled.
        """
        _, b, seg = self.tensors(h.device, h.dtype)
        pooled = h.mean(dim=(2, 3)) if self.conv is not None else h.reshape(h.shape[0], -1, h.shape[-1]).mean(1)
        onehot = F.one_hot(seg, n_experts).T.to(h.dtype)  # (N, R)
        return (pooled[:, None, :] * onehot[None]) @ b.flatten(1).T

    def delta_weight(self, coef: torch.Tensor) -> torch.Tensor:
        """Merged ``Σ_r coef_r · B_r A_r`` as a dense weight delta in fp32 (``coef (R,)``)."""
        d = (self.b_cat.flatten(1) * coef.float()[None, :]) @ self.a_cat.flatten(1)
        return d.reshape(self.out_dim, self.in_dim, *(self.kernel or ()))


def _add_linear(out: torch.Tensor, h: torch.Tensor, w_t: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``out + alpha · h w_t`` over the token dimensions as one fused GEMM, accumulated into ``out`` in place
    when :func:`_in_place_ok` (the layer's fresh output, eager sampling)."""
    h2 = h.reshape(-1, h.shape[-1])
    if _in_place_ok(out):
        out.view(-1, out.shape[-1]).addmm_(h2, w_t, alpha=alpha)
        return out
    return torch.addmm(out.reshape(-1, out.shape[-1]), h2, w_t, alpha=alpha).reshape(out.shape)


def _in_place_ok(out: torch.Tensor) -> bool:
    """Whether a hook may add into the layer's output in place: eager sampling only (no autograd graph to
    keep; under torch.compile the out-of-place form is what the compiler fuses, and in-place updates of a
    hooked module's output are not replayed faithfully there)."""
    return not torch.is_grad_enabled() and out.is_contiguous() and not torch.compiler.is_compiling()


def _match_batch(coef: torch.Tensor, batch: int, target: str) -> torch.Tensor:
    if coef.shape[0] in (1, batch):
        return coef
    if batch % coef.shape[0] == 0:
        return coef.repeat_interleave(batch // coef.shape[0], 0)
    raise MoleError(f"{target}: gates are for batch {coef.shape[0]} but the layer input has batch {batch}")
