"""LoRA files → experts through ComfyUI's own key maps and adapters.

``comfy.lora.model_lora_keys_unet/_clip`` name every format core knows (kohya LDM/diffusers names,
ComfyUI's ``diffusion_model.*``, old diffusers attention processors, ``text_encoders.*``), and
``comfy.lora.load_lora`` parses the tensors into ComfyUI patches. We only add the PEFT-style names
core does not map (``base_model.model.<diffusers path>``, ``unet.<diffusers path>``, bare diffusers
paths) and the alphas diffusers keeps in its ``lora_adapter_metadata`` header.

Each matched patch becomes a canonical :class:`mole_core.LoraFactor` (plain LoRA: its up/down/alpha;
LoHa, LoKr, Tucker, DoRA, OFT…: an exact dense delta computed by the adapter itself).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import comfy.lora
import comfy.lora_convert
import comfy.utils
import comfy.weight_adapter as wa
import folder_paths
import torch

import mole_core
from mole_core.expert import LoraFactor, factor_from_delta
from mole_core.lora_files import file_sha256, read_safetensors

from .comfy_index import KeyNamer, clip_prefixes
from .common import check_relative_name
from .types import ExpertEntry

log = logging.getLogger(__name__)

_PEFT_UNET_PREFIXES = ("base_model.model.", "unet.", "unet.base_model.model.", "")
_TE_HEADS = {"te": "text_encoder", "te2": "text_encoder_2"}
_WEIGHT_DEPENDENT = ("oft", "boft", "glora")  # adapters whose delta depends on the base weight
_KIND_NAMES = {"lora": "LoCon/Tucker", "loha": "LoHa", "lokr": "LoKr", "oft": "OFT", "boft": "BOFT", "glora": "GLoRA"}


def build_key_map(model: Any, clip: Any = None) -> dict[str, str]:
    """LoRA key prefix → ComfyUI model key: core's maps, extended with PEFT-style names."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})  # fresh dicts: the default is shared
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    for diff_key, ldm_key in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items():
        if diff_key.endswith(".weight"):
            module = diff_key[: -len(".weight")]
            for prefix in _PEFT_UNET_PREFIXES:
                key_map.setdefault(prefix + module, f"diffusion_model.{ldm_key}")
    if clip is not None:
        _add_clip_peft_keys(key_map, clip)
    return key_map


def _add_clip_peft_keys(key_map: dict[str, str], clip: Any) -> None:
    for prefix, comp in clip_prefixes(clip.cond_stage_model).items():
        for key in clip.cond_stage_model.state_dict():
            if not key.startswith(prefix) or not key.endswith(".weight"):
                continue
            path = key[len(prefix): -len(".weight")]  # text_model.encoder.layers.0.self_attn.q_proj
            bare = path.removeprefix("text_model.")    # transformers 5 CLIPTextModel layout
            names = [f"{_TE_HEADS[comp]}.{path}", f"{_TE_HEADS[comp]}.{bare}"]
            if comp == "te":
                names += [f"base_model.model.{path}", f"base_model.model.{bare}"]
            for name in names:
                key_map.setdefault(name, key)


def add_adapter_alphas(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Turn diffusers' ``lora_adapter_metadata`` (a LoraConfig per component) into ``.alpha`` keys.

    Returns the number of alphas added (0 when the file has no such metadata).
    """
    try:
        meta = json.loads(metadata.get("lora_adapter_metadata", "") or "{}")
    except json.JSONDecodeError:
        return 0
    added = 0
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        cfg = {k[len(comp) + 1:]: v for k, v in meta.items() if k.startswith(comp + ".")}
        if not cfg:
            continue
        for key in [k for k in sd if k.startswith(comp + ".") and k.endswith(".lora_A.weight")]:
            prefix = key[: -len(".lora_A.weight")]
            if prefix + ".alpha" in sd:
                continue
            rank = int(sd[key].shape[0])
            scale = mole_core.peft_scale(cfg, prefix[len(comp) + 1:], rank)
            if scale is not None:  # ComfyUI applies alpha / rank
                sd[prefix + ".alpha"] = torch.tensor(scale * rank)
                added += 1
    return added


def _prefix_of(key: str, key_map: dict[str, str]) -> str | None:
    parts = key.split(".")
    for n in range(1, min(4, len(parts))):
        p = ".".join(parts[:-n])
        for cand in (p, p.removesuffix("_lora")):
            if cand in key_map:
                return cand
    return None


def _base_weight(model_or_clip: Any, key: str) -> torch.Tensor:
    """The unpatched weight (ComfyUI may hold another clone's LoRA merged in place, with a backup)."""
    patcher = model_or_clip if hasattr(model_or_clip, "backup") else model_or_clip.patcher
    backup = patcher.backup.get(key)
    if backup is not None:
        return backup.weight
    return comfy.utils.get_attr(patcher.model, key)


def to_factor(patch: Any, key: str, weight: torch.Tensor) -> tuple[LoraFactor | None, str | None]:
    """A ComfyUI patch as a canonical factor; returns ``(factor, note)`` (note names a fallback)."""
    if isinstance(patch, wa.LoRAAdapter):
        up, down, alpha, mid, dora, reshape = patch.weights
        if mid is None and dora is None and reshape is None:
            return LoraFactor(down=down, up=up, alpha=alpha), None
    if isinstance(patch, wa.WeightAdapterBase):
        dora = isinstance(patch, wa.LoRAAdapter) and patch.weights[4] is not None
        dependent = dora or getattr(patch, "name", "") in _WEIGHT_DEPENDENT
        base = weight.detach().float().cpu() if dependent else torch.zeros(weight.shape)
        delta = patch.calculate_weight(base.clone(), key, 1.0, 1.0, None, lambda a: a) - base
        kind = getattr(patch, "name", type(patch).__name__)
        note = "DoRA" if dora else _KIND_NAMES.get(kind, kind)
        return factor_from_delta(delta), note
    if isinstance(patch, tuple) and patch and patch[0] == "diff":
        delta = patch[1][0].float()
        if delta.numel() == weight.numel():
            return factor_from_delta(delta.reshape(weight.shape)), "diff"
    return None, None


def _fits(factor: LoraFactor, weight: torch.Tensor) -> bool:
    """Whether ``up @ down`` has the layer's shape (1×1 convs and Linear layers are interchangeable)."""
    out_dim, in_numel = int(factor.up.shape[0]), int(factor.down[0].numel())
    return out_dim == weight.shape[0] and out_dim * in_numel == weight.numel()


def _shape(factor: LoraFactor) -> str:
    return f"{int(factor.down[0].numel())}→{int(factor.up.shape[0])}"


def _guess_format(keys: list[str]) -> str:
    for prefixes, fmt in ((("lora_unet_", "lora_te", "lycoris_"), "kohya"),
                          (("diffusion_model.", "text_encoders."), "comfyui"),
                          (("unet.", "text_encoder."), "diffusers"), (("base_model.model.",), "peft")):
        if any(k.startswith(prefixes) for k in keys):
            return fmt
    return "diffusers-peft"


def load_entry(model: Any, clip: Any, key_map: dict[str, str], name: str, path: str, strength: float,
               enabled: bool, family: str = "") -> ExpertEntry:
    """Read one LoRA file into an :class:`ExpertEntry` (ComfyUI patches + canonical factors).

    Raises:
        MoleError: not a ``.safetensors`` file, unreadable, or 0 targets in this model.
    """
    if not name.lower().endswith(".safetensors"):
        raise mole_core.MoleError(f"{name}: only .safetensors LoRA files are loaded (pickle formats can run code)")
    sd, metadata = read_safetensors(path)
    sd = comfy.lora_convert.convert_lora(sd)
    add_adapter_alphas(sd, metadata)
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
    namer = KeyNamer(model, clip)
    factors: dict[str, LoraFactor] = {}
    model_keys: dict[str, str] = {}
    kept: dict[str, Any] = {}
    notes: set[str] = set()
    mismatched: list[str] = []
    for key, patch in patches.items():
        canon = namer(key)
        if canon is None:
            continue
        owner = model if canon.startswith("unet:") else clip
        weight = _base_weight(owner, key)
        factor, note = to_factor(patch, key, weight)
        if factor is None:
            continue
        if not _fits(factor, weight):
            mismatched.append(f"{key}: LoRA {_shape(factor)}, layer {tuple(weight.shape)}")
            continue
        factors[canon], model_keys[canon], kept[key] = factor, key, patch
        if note:
            notes.add(note)
    unused = [k for k in sd if _prefix_of(k, key_map) is None]
    if not factors:
        example = mismatched[0] if mismatched else unused[0] if unused else ""
        raise mole_core.MoleError(f"{name}: 0 of its LoRA modules match this {family or 'model'} — a LoRA for "
                                  f"another model family?" + (f" (e.g. {example})" if example else ""))
    if notes:
        log.warning("MoLE: %s: %s modules are mixed through an exact dense delta (more memory than LoRA)",
                    name, "/".join(sorted(notes)))
    expert = mole_core.Expert(name=name, factors=factors, sha256=file_sha256(path), path=path,
                              format=_guess_format(list(sd)), metadata=dict(metadata or {}))
    return ExpertEntry(name=name, path=path, sha256=expert.sha256, strength=float(strength), enabled=bool(enabled),
                       expert=expert, patches=kept, model_keys=model_keys, report=_report(name, model_keys, unused))


def _report(name: str, model_keys: dict[str, str], unused: list[str]) -> str:
    n_unet = sum(1 for c in model_keys if c.startswith("unet:"))
    n_te = len(model_keys) - n_unet
    line = f"{name}: {len(model_keys)} targets matched ({n_unet} UNet, {n_te} text encoder)"
    if unused:
        line += f"; {len(unused)} file keys unused (e.g. {unused[0]})"
    return line


def lora_path(name: str, what: str = "lora") -> str:
    """Full path of a file of ``models/loras`` (``..`` and absolute names refused)."""
    check_relative_name(name, what, "models/loras")
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise mole_core.MoleError(f"`{what}`: {name!r} not found in models/loras")
    return os.fspath(path)
