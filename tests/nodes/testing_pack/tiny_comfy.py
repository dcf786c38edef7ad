"""Tiny ComfyUI models with the real SD1.5 topology (block names), built from a seed, no files.

UNet: ``channel_mult [1, 2, 2, 2]``, 2 res blocks per level, spatial transformers at
``input_blocks 1,2,4,5,7,8 / middle_block / output_blocks 3…11`` (depth 1), conv ``proj_in``,
model_channels 32, context 32 — the same layer names as SD1.5 at a width of 32.
CLIP: ``comfy.sd1_clip.SD1ClipModel`` (clip_l, 2 layers, hidden 32) with ComfyUI's bundled SD1
tokenizer, wrapped in a real ``comfy.sd.CLIP``.
VAE: ComfyUI's own ``AutoencoderKL`` (4 levels, 8× downscale, 4 latent channels like SD) at width 32,
wrapped in a real ``comfy.sd.VAE``.

Used both in-process by ``tests/nodes`` and by the test-only node pack in a headless server.
"""

from __future__ import annotations

import math

import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import torch

UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "channel_mult": [1, 2, 2, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 32, "num_heads": 2, "num_head_channels": -1, "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
CLIP_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
               "projection_dim": 32}
CONTEXT_DIM = 32
VAE_CONFIG = {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}


def fill_(module: torch.nn.Module, seed: int) -> None:
    """Deterministic weights (ComfyUI's ops leave them uninitialised): fan-in scaled normals, norms ≈ 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, sub in sorted(module.named_modules(), key=lambda kv: kv[0]):
            for pname, p in sorted(sub.named_parameters(recurse=False), key=lambda kv: kv[0]):
                noise = torch.randn(p.shape, generator=gen)
                if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and pname == "weight":
                    p.copy_(1.0 + 0.05 * noise)
                elif p.dim() >= 2:
                    fan_in = math.prod(p.shape[1:]) if not isinstance(sub, torch.nn.Embedding) else 50
                    p.copy_(noise / math.sqrt(fan_in))
                else:
                    p.copy_(0.05 * noise)


def as_patcher(model: comfy.model_base.BaseModel, seed: int) -> comfy.model_patcher.ModelPatcher:
    """``model`` with deterministic weights in a ``ModelPatcher`` on ComfyUI's devices."""
    fill_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32,
               model_type: comfy.model_base.ModelType = comfy.model_base.ModelType.EPS
               ) -> comfy.model_patcher.ModelPatcher:
    """A ``ModelPatcher`` over a tiny SD1.5-topology ``BaseModel`` (about 3.2 M parameters)."""
    cfg = comfy.supported_models.SD15({**UNET_CONFIG, "dtype": dtype})
    cfg.unet_config["num_heads"] = 2  # SD15.unet_extra_config forces 8
    model = comfy.model_base.BaseModel(cfg, model_type=model_type, device=torch.device("cpu"))
    return as_patcher(model, seed)


def tiny_clip(seed: int = 1) -> comfy.sd.CLIP:
    """A real ``comfy.sd.CLIP`` (SD1 tokenizer, clip_l) at hidden size 32, fp32."""
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": dict(CLIP_CONFIG), "dtype": torch.float32})
    fill_(clip.cond_stage_model, seed)
    return clip


def tiny_vae(seed: int = 2) -> comfy.sd.VAE:
    """A real ``comfy.sd.VAE`` over a small ``AutoencoderKL`` (about 0.4 M parameters), fp32."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ae = AutoencoderKL(**VAE_CONFIG)
    fill_(ae, seed)
    return comfy.sd.VAE(sd=ae.state_dict(), config={"params": VAE_CONFIG}, dtype=torch.float32)


def blob_images(count: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """``count`` reference images ``(count, size, size, 3)`` in [0, 1]: a coloured disc on a light background."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.full((count, size, size, 3), 235 / 255)
    for i in range(count):
        color = torch.rand(3, generator=gen) * 0.8 + 0.1
        r = int(torch.randint(size // 6, size // 3, (1,), generator=gen))
        cy, cx = (int(v) for v in torch.randint(r, size - r, (2,), generator=gen))
        images[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = color
    return images


def tiny_cond(seed: int, tokens: int = 7) -> list:
    """A CONDITIONING with a random context ``(1, tokens, 32)``."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, CONTEXT_DIM, generator=gen), {}]]


# ----- SDXL: two text encoders (CLIP-L + CLIP-G), ADM conditioning (pooled CLIP-G + 6 size/crop embeddings) -----
SDXL_CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
               "projection_dim": 32}
SDXL_CLIP_G = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
               "projection_dim": 32}
SDXL_UNET_CONFIG = {  # as ComfyUI's model detection writes SDXL's (transformer_depth_output is read from the end)
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": SDXL_CLIP_G["projection_dim"] + 6 * 256, "in_channels": 4,
    "model_channels": 32, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 2, 2],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 2, 2, 2], "channel_mult": [1, 2, 2], "transformer_depth_middle": 2,
    "use_linear_in_transformer": True, "context_dim": SDXL_CLIP_L["hidden_size"] + SDXL_CLIP_G["hidden_size"],
    "num_heads": 2, "num_head_channels": -1, "use_temporal_resblock": False, "use_temporal_attention": False,
}


def tiny_sdxl_model(seed: int = 0, model_type: comfy.model_base.ModelType = comfy.model_base.ModelType.EPS
                    ) -> comfy.model_patcher.ModelPatcher:
    """A ``ModelPatcher`` over a tiny SDXL ``model_base.SDXL``: SDXL's block layout (``input_blocks`` 4–8 with
    transformers of depth 2 at two levels, ``middle_block``, ``output_blocks`` 0–5 with transformers), linear
    ``proj_in``, ADM conditioning, at width 32 and transformer depth 2."""
    cfg = comfy.supported_models.SDXL({**SDXL_UNET_CONFIG, "dtype": torch.float32})
    cfg.unet_config.update(num_heads=2, num_head_channels=-1)  # SDXL's extra config asks 64-channel heads
    model = comfy.model_base.SDXL(cfg, model_type=model_type, device=torch.device("cpu"))
    return as_patcher(model, seed)


def tiny_sdxl_clip(seed: int = 1) -> comfy.sd.CLIP:
    """A real ``comfy.sd.CLIP`` over ComfyUI's ``SDXLClipModel`` (CLIP-L and CLIP-G, both at hidden size 32)."""
    import comfy.sdxl_clip

    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": dict(SDXL_CLIP_L),
                                                "clip_g_model_config": dict(SDXL_CLIP_G), "dtype": torch.float32})
    fill_(clip.cond_stage_model, seed)
    return clip


# ----- SD2.x 768-v: OpenCLIP-H text encoder (penultimate layer), linear proj_in, v-prediction -----
SD2_CLIP_H = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
              "projection_dim": 32}
SD2_UNET_CONFIG = {**UNET_CONFIG, "use_linear_in_transformer": True, "context_dim": SD2_CLIP_H["hidden_size"]}


def tiny_sd2_model(seed: int = 0, model_type: comfy.model_base.ModelType = comfy.model_base.ModelType.V_PREDICTION
                   ) -> comfy.model_patcher.ModelPatcher:
    """A ``ModelPatcher`` over a tiny SD2.x ``BaseModel`` from ComfyUI's ``SD20`` config: SD1.5's block names
    with SD2's linear ``proj_in``/``proj_out``, v-prediction (768-v) by default, at width 32."""
    cfg = comfy.supported_models.SD20({**SD2_UNET_CONFIG, "dtype": torch.float32})
    cfg.unet_config.update(num_heads=2, num_head_channels=-1)  # SD20's extra config asks 64-channel heads
    model = comfy.model_base.BaseModel(cfg, model_type=model_type, device=torch.device("cpu"))
    return as_patcher(model, seed)


def tiny_sd2_clip(seed: int = 1) -> comfy.sd.CLIP:
    """A real ``comfy.sd.CLIP`` over ComfyUI's ``SD2ClipModel`` (OpenCLIP-H layout ``clip_h``, its penultimate
    layer as SD2 uses it) at hidden size 32, fp32."""
    import comfy.text_encoders.sd2_clip as sd2_clip

    target = comfy.supported_models_base.ClipTarget(sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_h_model_config": dict(SD2_CLIP_H), "dtype": torch.float32})
    fill_(clip.cond_stage_model, seed)
    return clip

