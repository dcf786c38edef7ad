"""The diffusion model itself as a judge of composed samples (issue #12; ``block_routing.py --diffusion-judge``).

A sample shows a concept when the concept's LoRA explains it better than the base model does: noise the image's
latent at a few timesteps, and compare the base model's prediction error with the error once that LoRA alone is
attached (UNet and text encoder, weight 1), both conditioned on the image's own prompt. The gain, base error −
LoRA error, is positive when the LoRA "recognises" the image (a diffusion classifier: Li et al. 2023, "Your
Diffusion Model is Secretly a Zero-Shot Classifier"). It needs no CLIP and nothing but the models a user has.
"""

from __future__ import annotations

import numpy as np
import torch

import mole_core as mole
from mole_toy.training import encode

JUDGE_TIMESTEPS = (150, 350, 550, 750)  # of the 1000 training timesteps: from texture detail to layout


def _errors(pipe, latents: torch.Tensor, noise: torch.Tensor, prompts: list[str], batch: int) -> torch.Tensor:  # noqa: ANN001
    """Per image, the mean squared error of the model's prediction over :data:`JUDGE_TIMESTEPS` ``(N,)``."""
    sched, out = pipe.scheduler, []
    v_pred = sched.config.prediction_type == "v_prediction"
    for i in range(0, len(prompts), batch):
        z0 = latents[i:i + batch]
        emb = pipe.encode_prompt(prompts[i:i + batch], z0.device, 1, False)[0]
        err = torch.zeros(len(z0))
        for j, t in enumerate(JUDGE_TIMESTEPS):
            tt = torch.full((len(z0),), t, dtype=torch.long)
            eps = noise[j, i:i + batch]
            target = sched.get_velocity(z0, eps, tt) if v_pred else eps
            pred = pipe.unet(sched.add_noise(z0, eps, tt), tt, encoder_hidden_states=emb).sample
            err += ((pred.float() - target.float()) ** 2).mean((1, 2, 3))
        out.append(err / len(JUDGE_TIMESTEPS))
    return torch.cat(out)


@torch.no_grad()
def lora_gains(pipe, images: np.ndarray, prompts: list[str], experts: list[mole.Expert], seed: int,  # noqa: ANN001
               batch: int = 64) -> np.ndarray:
    """``(N, len(experts))``: for each image (``(N, H, W, 3)`` uint8) and expert, the base model's prediction
    error minus the error with that expert alone attached (static weight 1), conditioned on the image's prompt,
    averaged over :data:`JUDGE_TIMESTEPS`. The noise draws depend only on ``seed`` and the image's index, so
    the same prompts judged twice are compared on the same noise."""
    latents = encode(pipe.vae, images, batch)[0] * float(pipe.vae.config.scaling_factor)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(JUDGE_TIMESTEPS), *latents.shape), generator=gen)
    base = _errors(pipe, latents, noise, prompts, batch)
    gains = []
    for expert in experts:
        mix = mole.attach(pipe, [expert], mode="static", weights=[1.0])
        try:
            gains.append(base - _errors(pipe, latents, noise, prompts, batch))
        finally:
            mix.detach()
    return torch.stack(gains, 1).numpy()


def judge_score(gains: np.ndarray) -> float:
    """One number per set of images: the mean over images of the *weakest* named LoRA's gain (a composition
    needs every concept it names)."""
    return float(gains.min(1).mean())
