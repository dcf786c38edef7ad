"""Sampling and node-calling helpers for the in-process ComfyUI tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import comfy.model_management
import comfy.sample
import comfy.sd
import comfy.utils
import torch

from tests.nodes.conftest import COMFYUI
from tests.nodes.testing_pack.tiny_comfy import tiny_cond


def comfyui_nodes() -> ModuleType:
    """ComfyUI's own ``nodes.py`` (``VAEEncode``, ``CLIPTextEncode``…), found by its file path.

    Not by an absolute import of the top-level name: it could resolve to our ``nodes/`` package (the repo
    root is on ``sys.path`` in tests); ComfyUI owns that name and registers its module under it."""
    path = (COMFYUI / "nodes.py").resolve()
    loaded = sys.modules.get("nodes")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path:
        return loaded
    spec = importlib.util.spec_from_file_location("nodes", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["nodes"] = module
    spec.loader.exec_module(module)
    return module


def sample(model, pos=None, neg=None, size: int = 16, steps: int = 3, cfg: float = 5.0, seed: int = 0,
           batch: int = 1) -> torch.Tensor:
    """``comfy.sample.sample`` with euler/normal on a zero latent ``(batch, 4, size, size)``."""
    pos = pos if pos is not None else tiny_cond(10)
    neg = neg if neg is not None else tiny_cond(11)
    latent = torch.zeros(batch, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", pos, neg, latent, disable_pbar=True,
                               seed=seed)


def lora_loader(model, clip, path, strength_model: float, strength_clip: float | None = None):
    """Core ``LoraLoader`` (``comfy.sd.load_lora_for_models``): the oracle."""
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    return comfy.sd.load_lora_for_models(model, clip, lora, strength_model,
                                         strength_model if strength_clip is None else strength_clip)


def encode(clip, text: str = "a photo of a cat") -> torch.Tensor:
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0]


def unload_all() -> None:
    comfy.model_management.unload_all_models()


def slots(*picks) -> dict:
    """LoadExperts slot kwargs from ``(name, strength, on)`` tuples."""
    out = {}
    for i in range(1, 5):
        name, strength, on = picks[i - 1] if i <= len(picks) else ("None", 1.0, True)
        out.update({f"lora_{i}": name, f"strength_{i}": strength, f"on_{i}": on})
    return out


def sample_text(model, clip, width: int = 64, height: int = 64, steps: int = 3, size_cond: bool = False
                ) -> torch.Tensor:
    """``comfy.sample.sample`` (euler, CFG 5) conditioned by the model's own text encoder ("a photo of a cat",
    negative ""); ``size_cond`` adds SDXL's width/height to the conditioning (as ``CLIPTextEncodeSDXL`` does)."""
    def cond(text: str) -> list:
        c = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        return [[t, {**extra, "width": width, "height": height}] for t, extra in c] if size_cond else c

    latent = torch.zeros(1, 4, height // 8, width // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", cond("a photo of a cat"), cond(""),
                               latent, disable_pbar=True, seed=0)


def diffusers_twin(model):  # noqa: ANN001, ANN201 - a ComfyUI ModelPatcher → a diffusers UNet2DConditionModel
    """A diffusers ``UNet2DConditionModel`` with the topology of ``model``'s tiny UNet (SD1.5, SD2.x or SDXL with
    its ``text_time`` added conditioning) and, through ``comfy.utils.unet_to_diffusers``, its very weights: what the
    CLI's engine runs a diffusers pipeline folder on."""
    import diffusers

    cfg = model.model.model_config.unet_config
    per_level = cfg["num_res_blocks"][0]
    depth = [cfg["transformer_depth"][i * per_level] for i in range(len(cfg["channel_mult"]))]
    layers = tuple(max(d, 1) for d in depth)
    assert cfg["transformer_depth_middle"] == layers[-1], "diffusers' mid block takes the last level's depth"
    adm = cfg.get("adm_in_channels")
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], layers_per_block=per_level,
        block_out_channels=tuple(cfg["model_channels"] * m for m in cfg["channel_mult"]),
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)),
        transformer_layers_per_block=layers, cross_attention_dim=cfg["context_dim"],
        attention_head_dim=cfg["num_heads"], use_linear_projection=cfg["use_linear_in_transformer"], norm_num_groups=32,
        **(dict(addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=adm) if adm else {}),
    ).eval().requires_grad_(False)
    mapping = comfy.utils.unet_to_diffusers(cfg)
    comfy.model_management.unload_all_models()  # a loaded LoRA clone keeps its patches merged in place
    comfy_sd = model.model.diffusion_model.state_dict()
    unet.load_state_dict({k: comfy_sd[mapping[k]].reshape(v.shape).clone() for k, v in unet.state_dict().items()})
    return unet


def comfy_unet(model, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **extra) -> torch.Tensor:  # noqa: ANN001
    """One call of ``model``'s UNet as ComfyUI's ``BaseModel`` makes it (``context=``; SDXL: ``y=``), loaded the way
    sampling loads it (patches and MoLE hooks on) and unloaded after."""
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        comfy.model_management.load_models_gpu([model])
        try:
            return model.model.diffusion_model(x, timesteps=t, context=context, **extra)
        finally:
            comfy.model_management.unload_all_models()
