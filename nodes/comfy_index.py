"""ComfyUI models ↔ the engine's canonical names (``unet:<diffusers path>``, ``te:text_model.…``).

ComfyUI keeps the original LDM layout (``diffusion_model.input_blocks.1.1.proj_in``) and its CLIP
under ``clip_l.transformer.text_model.…``. Canonical names are diffusers paths, so a gate file
trained by the CLI on a diffusers model names the same layers. The UNet mapping is ComfyUI's own
``comfy.utils.unet_to_diffusers``; the text encoders only need a prefix swap.
"""

from __future__ import annotations

from typing import Any

import comfy.model_base
import comfy.utils
from torch import nn

import mole_core
from mole_core.naming import ldm_to_diffusers_unet

UNET_PREFIX = "diffusion_model."
# ComfyUI text-encoder attribute → canonical component, as diffusers names them: CLIP-G is always
# ``text_encoder_2`` ("te2"; the SDXL refiner has no ``text_encoder``), CLIP-L / CLIP-H are "te".
_CLIP_COMPONENTS = {"clip_l": "te", "clip_h": "te", "clip_g": "te2"}


def unet_key_map(base_model: Any) -> dict[str, str]:
    """``{"diffusion_model.<ldm path>.weight": "unet:<diffusers module path>"}`` for a UNet model.

    Raises:
        MoleError: the model is not a UNet (SD1.x/SD2.x/SDXL family).
    """
    unet_config = base_model.model_config.unet_config
    diffusers = comfy.utils.unet_to_diffusers(unet_config)
    if not diffusers:
        raise mole_core.MoleError(f"MoLE supports UNet models (SD1.x, SD2.x, SDXL); this model is "
                                  f"{type(base_model).__name__}")
    out = {}
    for diff_key, ldm_key in diffusers.items():
        if diff_key.endswith(".weight"):
            out[f"{UNET_PREFIX}{ldm_key}"] = "unet:" + diff_key[: -len(".weight")]
    return out


def unet_canonical(key: str, key_map: dict[str, str], layers_per_block: int = 2) -> str | None:
    """Canonical name of a ComfyUI UNet weight key (None for keys outside the UNet)."""
    if key in key_map:
        return key_map[key]
    if not key.startswith(UNET_PREFIX) or not key.endswith(".weight"):
        return None
    path = ldm_to_diffusers_unet(key[len(UNET_PREFIX): -len(".weight")], layers_per_block)
    return f"unet:{path}" if path else None


def clip_prefixes(cond_stage_model: nn.Module) -> dict[str, str]:
    """``{"clip_l.transformer.": "te", "clip_g.transformer.": "te2", ...}`` for a CLIP model."""
    return {f"{attr}.transformer.": comp for attr, comp in _CLIP_COMPONENTS.items()
            if isinstance(getattr(cond_stage_model, attr, None), nn.Module)}


def clip_canonical(key: str, prefixes: dict[str, str]) -> str | None:
    """``clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight`` → ``te:text_model.…fc1``."""
    if not key.endswith(".weight"):
        return None
    for prefix, comp in prefixes.items():
        if key.startswith(prefix):
            return f"{comp}:{key[len(prefix): -len('.weight')]}"
    return None


def layers_per_block(base_model: Any) -> int:
    res = base_model.model_config.unet_config.get("num_res_blocks", [2])
    return int(res[0]) if isinstance(res, (list, tuple)) else int(res)


class KeyNamer:
    """Canonical name of any ComfyUI weight key of a model and/or CLIP."""

    def __init__(self, model: Any = None, clip: Any = None):
        self.unet_map = unet_key_map(model.model) if model is not None else {}
        self.lpb = layers_per_block(model.model) if model is not None else 2
        self.clip_map = clip_prefixes(clip.cond_stage_model) if clip is not None else {}

    def __call__(self, key: Any) -> str | None:
        if not isinstance(key, str):  # (key, offset) tuples: sliced targets of Flux-type models
            return None
        if key.startswith(UNET_PREFIX):
            return unet_canonical(key, self.unet_map, self.lpb) if self.unet_map else None
        return clip_canonical(key, self.clip_map)


def family_of(model: Any) -> str:
    """``sdxl`` / ``sd2`` / ``sd1`` (as the CLI's gate files say) from ComfyUI's model class."""
    base = model.model
    if isinstance(base, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner)):
        return "sdxl"
    cfg = base.model_config.unet_config
    if cfg.get("use_linear_in_transformer"):
        return "sd2"
    return "sd1"


def build_index(model: Any = None, clip: Any = None) -> tuple[mole_core.ModelIndex, dict[str, str]]:
    """Engine view of a ComfyUI MODEL and/or CLIP: every Linear/Conv2d under its canonical name.

    Returns:
        ``(index, keys)``: the :class:`mole_core.ModelIndex` (modules of the shared ``BaseModel`` /
        ``cond_stage_model``, roots ``unet`` / ``te`` / ``te2``) and canonical → ComfyUI weight key.
    """
    namer = KeyNamer(model, clip)
    modules: dict[str, nn.Module] = {}
    keys: dict[str, str] = {}
    roots: dict[str, nn.Module] = {}
    if model is not None:
        roots["unet"] = model.model.diffusion_model
        for name, module in model.model.diffusion_model.named_modules():
            _add(modules, keys, namer, f"{UNET_PREFIX}{name}.weight", module)
    if clip is not None:
        csm = clip.cond_stage_model
        for prefix, comp in namer.clip_map.items():
            roots[comp] = comfy.utils.get_attr(csm, prefix.rstrip("."))
        for name, module in csm.named_modules():
            _add(modules, keys, namer, f"{name}.weight", module)
    family = family_of(model) if model is not None else ("sdxl" if "te2" in roots else "sd1")
    return mole_core.ModelIndex(modules=modules, roots=roots, family=family), keys


def _add(modules: dict, keys: dict, namer: KeyNamer, key: str, module: nn.Module) -> None:
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return
    canon = namer(key)
    if canon is not None:
        modules[canon] = module
        keys[canon] = key
