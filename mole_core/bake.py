"""Bake a static (or mean-gate) mixture: merge into weights, or export one standard LoRA file.

The export is the exact rank-R concatenation of the experts (R = Σ r_i per target) with each
rank row scaled by its coefficient, so any LoRA loader reproduces the static mixture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import MoleError
from .gate_file import atomic_save
from .mixture import Mixture
from .naming import split_name

EXPORT_FORMATS = ("kohya", "diffusers")


class BakedWeights:
    """Weights merged in place with an exact backup; :meth:`restore` puts the originals back."""

    def __init__(self, backups: dict[str, tuple[torch.nn.Module, torch.Tensor]]):
        self._backups = backups

    def restore(self) -> None:
        with torch.no_grad():
            for module, weight in self._backups.values():
                module.weight.copy_(weight)
        self._backups.clear()


def bake_into_model(mix: Mixture, per_scope: dict[str, list[float]] | None = None) -> BakedWeights:
    """Merge the static mixture into the model's weights (zero inference overhead) and detach hooks.

    Originals are kept as exact copies (never "unmerged" by subtraction).
    """
    deltas = mix.merged_deltas(per_scope)
    mix.detach()
    backups = {}
    with torch.no_grad():
        for target, delta in deltas.items():
            module = mix.index.modules[target]
            w = module.weight
            backups[target] = (module, w.detach().clone())
            w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
    return BakedWeights(backups)


def _kohya_name(name: str, sdxl: bool) -> str:
    comp, path = split_name(name)
    prefix = {"unet": "lora_unet", "te": "lora_te1" if sdxl else "lora_te", "te2": "lora_te2"}[comp]
    return f"{prefix}_{path.replace('.', '_')}"


def _diffusers_name(name: str) -> str:
    comp, path = split_name(name)
    return f"{ {'unet': 'unet', 'te': 'text_encoder', 'te2': 'text_encoder_2'}[comp] }.{path}"


def export_lora(mix: Mixture, path: str | os.PathLike, *, per_scope: dict[str, list[float]] | None = None,
                fmt: str = "kohya", dtype: torch.dtype = torch.float32) -> Path:
    """Write the static mixture as one LoRA file (rank R = Σ r_i per target, alpha = R ⇒ scale 1).

    Args:
        fmt: ``kohya`` (``lora_unet_*``, read by ComfyUI, A1111, diffusers) or ``diffusers``
            (``unet.*.lora_A/B``).
    """
    if fmt not in EXPORT_FORMATS:
        raise MoleError(f"`fmt` must be one of {EXPORT_FORMATS}, got {fmt!r}")
    coefs = mix.rank_coefficients(per_scope)
    sdxl = "te2" in mix.index.roots
    tensors: dict[str, torch.Tensor] = {}
    for target, coef in coefs.items():
        bank = mix.banks[target]
        keep = coef != 0
        if not keep.any():
            continue
        down = bank.a_cat[keep]
        up = bank.b_cat[:, keep] * coef[keep].reshape(1, -1, *([1] * (bank.b_cat.dim() - 2)))
        rank = int(keep.sum())
        if fmt == "kohya":
            key = _kohya_name(target, sdxl)
            tensors[f"{key}.lora_down.weight"] = down.to(dtype)
            tensors[f"{key}.lora_up.weight"] = up.to(dtype)
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
        else:
            key = _diffusers_name(target)
            tensors[f"{key}.lora_A.weight"] = down.to(dtype)
            tensors[f"{key}.lora_B.weight"] = up.to(dtype)
    if not tensors:
        raise MoleError("the mixture is empty (every coefficient is 0): nothing to export")
    meta = {"format": "pt", "mole_export": json.dumps({"experts": [e.summary() for e in mix.experts],
                                                       "mode": mix.mode, "strength": mix.strength})}
    atomic_save(tensors, path, meta)
    return Path(path)
