"""The small interface the trainer needs from a diffusion host (diffusers here, ComfyUI in nodes/).

A backend encodes images and prompts, predicts with the denoiser, decodes latents and tells the
prediction type and the discrete noise schedule ``alphas_cumprod``. Noise/target/x0 maths are
host-independent and live here.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class Backend(Protocol):
    """What :func:`train.engine.train` calls. Conditioning is an opaque dict of tensors whose
    leading dimension is the batch (so the trainer can index and cache it)."""

    device: torch.device
    prediction_type: str
    alphas_cumprod: torch.Tensor  # (T,) float, on CPU

    def mixture_target(self) -> Any:
        """What :func:`mole_core.attach` takes to find the model's layers (pipeline, dict, ModelIndex)."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] → latents ``(B, C, h, w)`` (scaled as the denoiser expects)."""

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts → conditioning dict, batch-first tensors."""

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Denoiser output for noisy latents at integer timesteps ``t (B,)``."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1] (differentiable)."""

    def denoiser_modules(self) -> list[torch.nn.Module]:
        """Modules whose parameters must be frozen during gate training."""

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn activation recomputation of the denoiser on or off."""

    # Optional, for hosts that encode prompts once, before training (ComfyUI):
    # ``encode_base_prompts(prompts)``: conditioning without any LoRA in the text encoders (the compose
    # objective's prior term; by default the mixtures are detached and ``encode_prompts`` is called);
    # ``latent_shape(resolution)``: ``(C, h, w)`` of one latent (by default one VAE encode).


def _coeffs(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = alphas_cumprod.to(like.device)[t].to(like.dtype)
    shape = (-1, *([1] * (like.dim() - 1)))
    return a.sqrt().reshape(shape), (1 - a).sqrt().reshape(shape)


def add_noise(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward process ``x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε``."""
    sa, sb = _coeffs(alphas_cumprod, t, x0)
    return sa * x0 + sb * noise


def training_target(prediction_type: str, alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """What the denoiser should output: ε, v = √ᾱ ε − √(1−ᾱ) x0, or x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    sa, sb = _coeffs(alphas_cumprod, t, x0)
    return sa * noise - sb * x0


def predicted_x0(prediction_type: str, alphas_cumprod: torch.Tensor, x_t: torch.Tensor, out: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
    """Denoised estimate from the model output (used by the CLIP objective)."""
    if prediction_type == "sample":
        return out
    sa, sb = _coeffs(alphas_cumprod, t, x_t)
    if prediction_type == "epsilon":
        return (x_t - sb * out) / sa
    return sa * x_t - sb * out
