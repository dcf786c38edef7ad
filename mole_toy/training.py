"""Training loops for the toy world: VAE, diffusion model (base and LoRA), shape classifier.

All loops are deterministic: data order and noise come from a ``torch.Generator`` seeded by the
caller, and the build pins torch to one thread (see :mod:`mole_toy.build`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import probes
from .world import SHAPES, Spec

Log = Callable[[str], None]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 → ``(N, 3, H, W)`` float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(N, 3, H, W)`` in [-1, 1] → ``(N, H, W, 3)`` uint8."""
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().permute(0, 2, 3, 1).to(torch.uint8).numpy()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * frac)))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _every(step: int, total: int, n: int = 5) -> bool:
    return step == total - 1 or step % max(1, total // n) == 0


# ----- VAE -----

def train_vae(vae: torch.nn.Module, images: np.ndarray, *, steps: int, batch: int, lr: float, crop: int,
              kl_weight: float, seed: int, log: Log = print) -> dict:
    """Fit ``vae`` to reconstruct ``images`` (MSE on random ``crop``×``crop`` crops, + KL)."""
    x_all = to_tensor(images)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train().requires_grad_(True)
    size = x_all.shape[-1]
    t0 = time.time()
    for step in range(steps):
        _set_lr(opt, lr_at(step, steps, lr, max(1, steps // 20)))
        x = x_all[torch.randint(0, len(x_all), (batch,), generator=gen)]
        oy, ox = torch.randint(0, size - crop + 1, (2,), generator=gen).tolist()
        x = x[:, :, oy:oy + crop, ox:ox + crop]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample(generator=gen)).sample
        mse = F.mse_loss(recon, x)
        loss = mse + kl_weight * post.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if _every(step, steps):
            log(f"  vae step {step + 1}/{steps}  mse {mse.item():.4f}  ({time.time() - t0:.0f} s)")
    vae.eval().requires_grad_(False)
    return {"steps": steps, "seconds": round(time.time() - t0, 1), "final_mse": round(mse.item(), 5)}


@torch.no_grad()
def encode(vae: torch.nn.Module, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior ``(mean, std)`` of ``images``, each ``(N, C, h, w)``, unscaled."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(to_tensor(images[i:i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Unscaled latents → ``(N, H, W, 3)`` uint8 images."""
    return np.concatenate([to_uint8(vae.decode(latents[i:i + batch]).sample) for i in range(0, len(latents), batch)])


# ----- diffusion -----

@dataclass
class LatentSet:
    """Training pairs: scaled VAE posterior ``(mean, std)`` ``(N, 4, 16, 16)`` and token ids ``(N, 77)``."""

    mean: torch.Tensor
    std: torch.Tensor
    ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


def tokenize(tokenizer: object, captions: list[str]) -> torch.Tensor:
    """Token ids ``(N, 77)`` padded like ``StableDiffusionPipeline`` does."""
    out = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    return out.input_ids


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Min-SNR-γ weights for ε-prediction (Hang et al. 2023): ``min(SNR, γ) / SNR``; all 1 if ``gamma`` is None."""
    if gamma is None:
        return torch.ones(len(t))
    ac = alphas_cumprod[t]
    snr = ac / (1.0 - ac)
    return torch.clamp(snr, max=gamma) / snr


class Ema:
    """Exponential moving average of parameters (used for the sampled weights)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def diffusion_loss(unet: torch.nn.Module, text_encoder: torch.nn.Module, scheduler: object, data: LatentSet,
                   idx: torch.Tensor, empty_ids: torch.Tensor, drop: float, gen: torch.Generator,
                   snr_gamma: float | None, offset_noise: float = 0.0) -> torch.Tensor:
    """Diffusion MSE (ε or v target, as the scheduler predicts) on a batch ``idx``; captions are replaced by
    the empty prompt with probability ``drop``."""
    z = data.mean[idx] + data.std[idx] * torch.randn(data.mean[idx].shape, generator=gen)
    ids = data.ids[idx].clone()
    dropped = torch.rand(len(idx), generator=gen) < drop
    ids[dropped] = empty_ids
    noise = torch.randn(z.shape, generator=gen)
    if offset_noise:  # per-image, per-channel shift: the noisiest inputs must not reveal the image's mean colour
        noise = noise + offset_noise * torch.randn(z.shape[0], z.shape[1], 1, 1, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
    noisy = scheduler.add_noise(z, noise, t)
    target = scheduler.get_velocity(z, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
    cond = text_encoder(ids)[0]
    pred = unet(noisy, t, cond).sample
    per = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    return (per * min_snr_weights(scheduler.alphas_cumprod, t, snr_gamma)).mean()


def train_diffusion(unet: torch.nn.Module, text_encoder: torch.nn.Module, scheduler: object, data: LatentSet,
                    params: list[torch.nn.Parameter], *, steps: int, batch: int, lr: float, seed: int,
                    empty_ids: torch.Tensor, drop: float = 0.15, snr_gamma: float | None = None,
                    ema_decay: float | None = None, offset_noise: float = 0.0, label: str = "unet",
                    log: Log = print) -> dict:
    """Train ``params`` (the whole model, or only LoRA factors) with the diffusion loss.

    With ``ema_decay`` the parameters end as their exponential moving average.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = Ema(params, ema_decay) if ema_decay else None
    unet.train()
    text_encoder.train()
    t0, smooth = time.time(), None
    for step in range(steps):
        _set_lr(opt, lr_at(step, steps, lr, max(1, steps // 20)))
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        loss = diffusion_loss(unet, text_encoder, scheduler, data, idx, empty_ids, drop, gen, snr_gamma, offset_noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if _every(step, steps):
            log(f"  {label} step {step + 1}/{steps}  loss {smooth:.4f}  ({time.time() - t0:.0f} s)")
    if ema is not None:
        ema.copy_to_params()
    unet.eval()
    text_encoder.eval()
    return {"steps": steps, "batch": batch, "lr": lr, "seconds": round(time.time() - t0, 1),
            "final_loss": round(float(smooth), 5)}


# ----- shape classifier -----

def _augment(masks: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur some masks, add noise and random gain, so the classifier tolerates generated images."""
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
    blurred = F.conv2d(masks, blur[None, None], padding=1)
    pick = (torch.rand(len(masks), 1, 1, 1, generator=gen) < 0.5).float()
    x = pick * blurred + (1 - pick) * masks
    x = x * (0.7 + 0.3 * torch.rand(len(masks), 1, 1, 1, generator=gen))
    return (x + 0.08 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def train_shape_net(net: probes.ShapeNet, specs: list[Spec], images: np.ndarray, *, steps: int, batch: int,
                    lr: float, seed: int, log: Log = print) -> dict:
    """Fit ``net`` to the generator's ground-truth shapes from soft foreground masks."""
    x_all = probes.mask_tensor(list(images.astype(np.float64)))
    y_all = torch.tensor([SHAPES.index(s.shape) for s in specs])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    net.train()
    t0 = time.time()
    for step in range(steps):
        _set_lr(opt, lr_at(step, steps, lr, max(1, steps // 20)))
        idx = torch.randint(0, len(x_all), (batch,), generator=gen)
        loss = F.cross_entropy(net(_augment(x_all[idx], gen)), y_all[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if _every(step, steps):
            log(f"  shape-net step {step + 1}/{steps}  loss {loss.item():.4f}  ({time.time() - t0:.0f} s)")
    net.eval()
    return {"steps": steps, "seconds": round(time.time() - t0, 1)}
