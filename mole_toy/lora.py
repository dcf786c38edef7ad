"""Concept LoRAs: PEFT adapters on the UNet and the CLIP text encoder, saved as ordinary LoRA files.

Training uses ``peft.LoraConfig`` + ``peft.inject_adapter_in_model`` (transformers' own
``add_adapter`` needs peft ≥ 0.22). The trained factors leave through ``peft.get_peft_model_state_dict``
and are written in one of two common layouts:

* ``kohya``: ``lora_unet_<path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` and
  ``lora_te_text_model_<path>…`` (via ``diffusers.utils.convert_state_dict_to_kohya``; its SDXL-style
  ``lora_te1_`` prefix is renamed to the SD1.x ``lora_te_`` that real files use);
* ``diffusers``: ``unet.<path>.lora_A.weight`` / ``text_encoder.text_model.<path>.lora_B.weight``
  (via ``StableDiffusionPipeline.save_lora_weights``, with the PEFT config as adapter metadata).

Text-encoder paths get the ``text_model.`` wrapper that transformers 5 dropped, as in files in the wild.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "time_emb_proj")  # attention + ResNet convs (LoCon-style) + caption/time input
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
FORMATS = ("kohya", "diffusers")
ADAPTER = "default"


def lora_config(rank: int, targets: tuple[str, ...]):  # noqa: ANN201 - peft type
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights="gaussian")


def with_adapters(unet: torch.nn.Module, text_encoder: torch.nn.Module, rank: int, seed: int
                  ) -> tuple[torch.nn.Module, torch.nn.Module, list[torch.nn.Parameter]]:
    """Copies of ``unet`` and ``text_encoder`` with fresh LoRA adapters; returns them and the trainable factors."""
    from peft import inject_adapter_in_model

    unet, text_encoder = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = inject_adapter_in_model(lora_config(rank, UNET_TARGETS), unet, adapter_name=ADAPTER)
        text_encoder = inject_adapter_in_model(lora_config(rank, TE_TARGETS), text_encoder, adapter_name=ADAPTER)
    params = []
    for model in (unet, text_encoder):
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
            if "lora_" in name:
                params.append(p)
    return unet, text_encoder, params


def adapter_state(unet: torch.nn.Module, text_encoder: torch.nn.Module, dtype: torch.dtype = torch.float16
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """PEFT-layout factors ``(unet, text encoder)``; text-encoder keys get the ``text_model.`` wrapper."""
    from peft import get_peft_model_state_dict

    unet_sd = {k: v.detach().to(dtype).contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    te_sd = {("text_model." + k if not k.startswith("text_model.") else k): v.detach().to(dtype).contiguous()
             for k, v in get_peft_model_state_dict(text_encoder).items()}
    return unet_sd, te_sd


def save_kohya(path: Path, unet_sd: dict, te_sd: dict, metadata: dict[str, str]) -> Path:
    """Write a kohya-style file (``alpha`` stored per module, equal to the rank)."""
    from diffusers.utils import convert_state_dict_to_kohya

    peft_sd = {**{f"unet.{k}": v for k, v in unet_sd.items()}, **{f"text_encoder.{k}": v for k, v in te_sd.items()}}
    kohya = {}
    for key, value in convert_state_dict_to_kohya(peft_sd).items():
        key = key.replace("lora_te1_", "lora_te_", 1)
        kohya[key] = value.to(torch.float16) if key.endswith(".alpha") else value
    save_file(kohya, str(path), metadata=metadata)
    return path


def save_diffusers(path: Path, unet_sd: dict, te_sd: dict, metadata: dict[str, str], rank: int) -> Path:
    """Write a diffusers-layout file with ``save_lora_weights``, then re-save it with our metadata added."""
    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd, weight_name="lora.safetensors",
            safe_serialization=True,
            unet_lora_adapter_metadata=lora_config(rank, UNET_TARGETS).to_dict(),
            text_encoder_lora_adapter_metadata=lora_config(rank, TE_TARGETS).to_dict())
        from safetensors import safe_open

        src = Path(tmp) / "lora.safetensors"
        with safe_open(str(src), "pt") as fh:
            meta = dict(fh.metadata() or {})
        save_file(load_file(str(src)), str(path), metadata={**meta, **metadata})
    return path


def save_lora(path: str | Path, fmt: str, unet: torch.nn.Module, text_encoder: torch.nn.Module, rank: int,
              metadata: dict) -> Path:
    """Save the adapters of ``unet``/``text_encoder`` as ``fmt`` (``kohya`` | ``diffusers``) in fp16."""
    if fmt not in FORMATS:
        raise ValueError(f"`fmt` must be one of {FORMATS}, got {fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unet_sd, te_sd = adapter_state(unet, text_encoder)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    if fmt == "kohya":
        return save_kohya(path, unet_sd, te_sd, meta)
    return save_diffusers(path, unet_sd, te_sd, meta, rank)
