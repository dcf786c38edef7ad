"""Backend over a diffusers Stable Diffusion (1.x/2.x) or SDXL pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mole_core import MoleError

from .backend import PREDICTION_TYPES


def load_pipeline(base: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,  # noqa: ANN201
                  name: str = "base model"):
    """Load a diffusers folder (or a single-file checkpoint diffusers can read offline); errors name the
    input ``name`` (the CLI passes its flag)."""
    import diffusers

    quiet_libraries()
    p = Path(base)
    if not p.exists():
        raise MoleError(f"{name} {p}: not found")
    try:
        if p.is_dir():
            if not (p / "model_index.json").exists():
                raise MoleError(f"{name} {p}: not a diffusers folder (no model_index.json)")
            cls_name = json.loads((p / "model_index.json").read_text()).get("_class_name", "StableDiffusionPipeline")
            cls = getattr(diffusers, cls_name, diffusers.DiffusionPipeline)
            kwargs = {"safety_checker": None, "requires_safety_checker": False} if "XL" not in cls_name else {}
            pipe = cls.from_pretrained(str(p), local_files_only=True, dtype=dtype, **kwargs)
        elif p.suffix == ".safetensors":
            pipe = diffusers.StableDiffusionPipeline.from_single_file(str(p), local_files_only=True,
                                                                      dtype=dtype)
        else:
            raise MoleError(f"{name} {p}: give a diffusers folder or a .safetensors checkpoint")
    except MoleError:
        raise
    except Exception as exc:  # diffusers raises many types; report one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoleError(f"{name} {p}: diffusers could not load it offline ({msg[:200]}); "
                        "convert it to a diffusers folder first") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def quiet_libraries() -> None:
    """Silence load-time progress bars and transformers' spurious "LOAD REPORT" tables."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class DiffusersBackend:
    """Implements :class:`train.backend.Backend` for StableDiffusion(XL)Pipeline objects."""

    def __init__(self, pipe, resolution: int = 512):  # noqa: ANN001
        self.pipe = pipe
        self.unet = pipe.unet
        self.vae = pipe.vae
        self.device = self.unet.device
        self.is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
        sched = pipe.scheduler.config
        self.prediction_type = sched.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise MoleError(f"unsupported prediction type {self.prediction_type!r}")
        self.alphas_cumprod = self._alphas(sched)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling = float(self.vae.config.scaling_factor)
        self.resolution = resolution

    @staticmethod
    def _alphas(cfg) -> torch.Tensor:  # noqa: ANN001
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(cfg).alphas_cumprod.float().cpu()

    def mixture_target(self):  # noqa: ANN201
        return self.pipe

    def denoiser_modules(self) -> list[nn.Module]:
        mods = [self.unet, self.vae, self.pipe.text_encoder]
        if self.is_sdxl:
            mods.append(self.pipe.text_encoder_2)
        return [m for m in mods if m is not None]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.unet.enable_gradient_checkpointing()
            self.unet.train()
        else:
            if getattr(self.unet, "is_gradient_checkpointing", False):
                self.unet.disable_gradient_checkpointing()
            self.unet.eval()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, self.vae.dtype)
        return self.vae.encode(images).latent_dist.mean * self.scaling

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if not self.is_sdxl:
            emb, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
            return {"encoder_hidden_states": emb}
        emb, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=emb.dtype, device=self.device).repeat(len(prompts), 1)
        return {"encoder_hidden_states": emb, "text_embeds": pooled, "time_ids": time_ids}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]} if self.is_sdxl else None
        x_t = x_t.to(self.unet.dtype)
        return self.unet(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"].to(self.unet.dtype),
                         added_cond_kwargs=added).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.dtype) / self.scaling).sample
