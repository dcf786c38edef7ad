"""The explicit schema of a LoRA module's tensors, checked before any of them is used: anything else is a
one-line MoleError naming the expert, the module and what was expected.

Every tensor is floating point (an int or bool factor is a broken file, not something to cast). ``alpha`` is one
finite number with ``|alpha| ≤`` :data:`MAX_ALPHA`. Factors (``down``/``up``/``mid``, LoHa ``hada_*``, LoKr
``lokr_*``, GLoRA ``a1``/``a2``/``b1``/``b2``, full ``diff``) are 2-D (linear) or 4-D (conv), OFT's ``oft_blocks``
3-D (BOFT's 4-D) and ``rescale`` 1- to 4-D, with no empty dimension (rank ≥ 1) and finite entries
``|x| ≤`` :data:`MAX_FACTOR` (real LoRAs stay below ~10; beyond this a product overflows half precision); NaN
entries are refused when the expert is attached (:func:`mole_core.expert.check_experts`). ``up``'s rank equals
``down``'s; a conv ``up`` is ``(out, r, 1, 1)``. ``diff_b`` (a bias patch) is 1-D.
"""

from __future__ import annotations

import math

import torch

from .errors import MoleError

MAX_FACTOR = 1e3
MAX_ALPHA = 1e5
_DIMS = {"diff_b": (1,), "oft_blocks": (3, 4), "rescale": (1, 2, 3, 4)}  # roles not 2-D or 4-D


def check_module(expert: str, prefix: str, roles: dict[str, torch.Tensor]) -> None:
    """Raise a one-line MoleError if a LoRA module's tensors break the schema (see the module docstring)."""
    where = f"expert {expert!r}: {prefix}"
    for role, t in roles.items():
        if not t.is_floating_point():
            raise MoleError(f"{where}: {role} must be floating point, got {t.dtype}")
        if role == "alpha":
            if t.numel() != 1:
                raise MoleError(f"{where}: alpha must be one number, got shape {tuple(t.shape)}")
            a = float(t.float().reshape(()))
            if not math.isfinite(a) or abs(a) > MAX_ALPHA:
                raise MoleError(f"{where}: alpha must be finite with |alpha| ≤ {MAX_ALPHA:g}, got {a}")
            continue
        dims = _DIMS.get(role, (2, 4))
        if t.dim() not in dims or t.numel() == 0:
            raise MoleError(f"{where}: {role} must be a {' or '.join(f'{d}-D' for d in dims)} tensor with no empty "
                            f"dimension, got shape {tuple(t.shape)}")
        finite = t[torch.isfinite(t)].float()
        if (finite.numel() and float(finite.abs().max()) > MAX_FACTOR) or torch.isinf(t).any():
            raise MoleError(f"{where}: {role} has entries beyond ±{MAX_FACTOR:g} (a corrupt or diverged LoRA)")
    if "down" in roles and "up" in roles:
        down, up = roles["down"], roles["up"]
        rank = down.shape[0]
        if "mid" in roles:
            mid = roles["mid"]
            if mid.dim() != 4 or down.dim() not in (2, 4) or mid.shape[1] != rank or \
                    (down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)):
                raise MoleError(f"{where}: Tucker mid {tuple(mid.shape)} does not fit down {tuple(down.shape)}")
            rank = mid.shape[0]
        elif up.dim() != down.dim():
            raise MoleError(f"{where}: up {tuple(up.shape)} and down {tuple(down.shape)} differ in dimensions")
        if up.shape[1] != rank:
            raise MoleError(f"{where}: up has rank {up.shape[1]}, down has rank {rank}")
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise MoleError(f"{where}: a conv up must be (out, r, 1, 1), got {tuple(up.shape)}")
