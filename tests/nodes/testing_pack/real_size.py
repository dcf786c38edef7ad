"""Real-size models with random weights, built with ComfyUI's own classes (issue #16): SDXL base's UNet and text
encoders for the memory check of one training step, and single-file SD1.5, SD2.x 768-v and SDXL checkpoints written by
ComfyUI's own checkpoint saver, in the layout users download, for ``CheckpointLoaderSimple``. ComfyUI recognises a
model by its exact widths, so a tiny model cannot go through that loader. Slow and large: tests that use them are
marked ``slow`` and run one at a time."""

from __future__ import annotations

from pathlib import Path

import comfy.model_base
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.supported_models_base
import torch

from .tiny_comfy import SDXL_UNET_CONFIG, UNET_CONFIG, as_patcher, fill_

SDXL_REAL_UNET_CONFIG = {**SDXL_UNET_CONFIG, "adm_in_channels": 2816, "model_channels": 320,
                         "transformer_depth": [0, 0, 2, 2, 10, 10],
                         "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "channel_mult": [1, 2, 4],
                         "transformer_depth_middle": 10, "context_dim": 2048, "num_heads": -1,
                         "num_head_channels": 64}
SD15_UNET_CONFIG = {**UNET_CONFIG, "model_channels": 320, "channel_mult": [1, 2, 4, 4], "context_dim": 768}
SD2_UNET_CONFIG = {**SD15_UNET_CONFIG, "context_dim": 1024, "use_linear_in_transformer": True}
VAE_CONFIG = {"embed_dim": 4, "ddconfig": {  # the SD / SDXL VAE
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}
V_PRED_NORM = "output_blocks.11.1.transformer_blocks.0.norm1.bias"  # ComfyUI tells SD2 768-v by its spread


def real_sdxl_model(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """SDXL base's UNet at its real size (2.6 B parameters, 10.3 GB in fp32) with random weights."""
    return as_patcher(_base_model("sdxl", torch.device("cpu")), seed)


def real_sdxl_clip(seed: int = 1) -> comfy.sd.CLIP:
    """ComfyUI's ``SDXLClipModel`` at its real size (CLIP-L and OpenCLIP bigG, 0.8 B parameters) with random
    weights."""
    return _clip("sdxl", seed)


def _base_model(family: str, device: torch.device) -> comfy.model_base.BaseModel:
    """The UNet of ``family``: ``sd15`` (ε), ``sd2v`` (SD2.x 768-v) or ``sdxl`` (SDXL base: ADM size and crop
    conditioning), fp32, weights left as allocated."""
    if family == "sdxl":
        return comfy.model_base.SDXL(comfy.supported_models.SDXL({**SDXL_REAL_UNET_CONFIG, "dtype": torch.float32}),
                                     device=device)
    if family == "sd15":
        cfg = comfy.supported_models.SD15({**SD15_UNET_CONFIG, "dtype": torch.float32})
        model_type = comfy.model_base.ModelType.EPS
    elif family == "sd2v":
        cfg = comfy.supported_models.SD20({**SD2_UNET_CONFIG, "dtype": torch.float32})
        model_type = comfy.model_base.ModelType.V_PREDICTION
    else:
        raise ValueError(family)
    return comfy.model_base.BaseModel(cfg, model_type=model_type, device=device)


def _clip(family: str, seed: int | None, device: torch.device | None = None) -> comfy.sd.CLIP:
    """CLIP-L (``sd15``), OpenCLIP-H (``sd2v``) or CLIP-L + OpenCLIP bigG (``sdxl``), filled from ``seed`` unless it
    is None."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.text_encoders.sd2_clip as sd2_clip

    tokenizer, model = {"sd15": (comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                        "sd2v": (sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel),
                        "sdxl": (comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)}[family]
    target = comfy.supported_models_base.ClipTarget(tokenizer, model)
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32,
                                                **({"initial_device": device} if device is not None else {})})
    if seed is not None:
        fill_(clip.cond_stage_model, seed)
    return clip


def _vae(seed: int) -> comfy.sd.VAE:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ae = AutoencoderKL(**VAE_CONFIG)
    fill_(ae, seed)
    return comfy.sd.VAE(sd=ae.state_dict(), config={"params": VAE_CONFIG}, dtype=torch.float32)


def write_checkpoint(path: str | Path, family: str, seed: int = 0) -> Path:
    """A single-file checkpoint (UNet, text encoders and VAE in the original LDM layout, fp32) of ``family``
    ``sd15`` (CLIP-L, 4 GB), ``sd2v`` (SD2.x 768-v: OpenCLIP-H, v-prediction, 5 GB) or ``sdxl`` (SDXL base: CLIP-L
    and OpenCLIP bigG, ADM conditioning, 14 GB, building it peaks at 14 GB), saved by ``comfy.sd.save_checkpoint``."""
    with torch.inference_mode(False):
        model = _base_model(family, torch.device("cpu"))
        patcher = as_patcher(model, seed)
        if family == "sd2v":
            with torch.no_grad():
                bias = model.diffusion_model.state_dict()[V_PRED_NORM]
                bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(seed)) * 0.2)
        comfy.sd.save_checkpoint(str(path), patcher, _clip(family, seed + 1), _vae(seed + 2))
    return Path(path)


def weightless(family: str) -> tuple[comfy.model_patcher.ModelPatcher, comfy.sd.CLIP]:
    """The UNet and text encoder of :func:`write_checkpoint`'s ``family`` file on the meta device: the layer names
    and shapes ``CheckpointLoaderSimple`` gives, without the 4 GB of weights (enough to build LoRAs for the file
    in a process that does not load it)."""
    meta = torch.device("meta")
    model = comfy.model_patcher.ModelPatcher(_base_model(family, meta), load_device=meta, offload_device=meta)
    return model, _clip(family, None, meta)
