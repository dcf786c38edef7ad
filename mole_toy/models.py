"""The toy text-to-image model's components and their configurations (diffusers / transformers classes).

* VAE: a pixel-space ``AutoencoderKL`` (one level, no downscale, 3 latent channels) whose weights are
  set by hand so that encode and decode are the identity up to ~1e-4 (see :func:`make_pixel_vae`):
  the diffusion model works on the 32×32×3 pixels in [-1, 1], and the pipeline stays a standard
  ``StableDiffusionPipeline``.
* UNet: ``UNet2DConditionModel`` on 32×32×3, widths 16/32/48/64 (32, 16, 8, 4 px), one res block per
  level, cross-attention (4 heads) at 8×8, 4×4 and the middle; cross-attention dim 64. The caption's
  attention-pooled embedding is also added to the time embedding (``addition_embed_type="text"``), so
  every ResNet sees the caption: global attributes are learned several times faster.
* Text encoder: ``CLIPTextModel``, 2 layers, hidden 64, 4 heads, the full CLIP vocabulary (49408)
  so the standard CLIP tokenizer works.
* Scheduler: DDIM, Stable Diffusion's β schedule (scaled_linear 0.00085 → 0.012, 1000 steps) rescaled to
  zero terminal SNR, v-prediction, "trailing" timesteps (Lin et al. 2023, "Common diffusion noise schedules
  and sample steps are flawed"). With ε-prediction the model never learned black or white backgrounds: the
  noisiest training inputs still leak the image's mean colour, which pure noise at sampling lacks; DDPM's
  linear schedule (almost no leak) needs a far more precise ε at high noise than this short training gives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .world import SIZE

LATENT_CHANNELS = 3
VAE_DOWN = 1
LATENT_SIZE = SIZE // VAE_DOWN
TEXT_HIDDEN = 64
CLIP_VOCAB = 49408
BOS_ID, EOS_ID = 49406, 49407
VAE_WIDTH = 16  # 4 groups of 4 channels: (s·x, −s·x, L, −L) per RGB channel, one spare group
VAE_SIGNAL, VAE_LEVEL = 1.0, 64.0  # s and L: L ≫ s makes GroupNorm's scale almost image-independent
LATENT_SCALE = 1.5  # ≈ 1 / std of the pixels in [-1, 1], as SD scales its latents to unit variance
VAE_LOGVAR = -20.0  # posterior std e^-10: sampling equals the mean

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(VAE_WIDTH,), layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=4,
    sample_size=SIZE, scaling_factor=LATENT_SCALE, mid_block_add_attention=False, force_upcast=False,
)
UNET_CONFIG = dict(
    sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
    block_out_channels=(16, 32, 48, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4, norm_num_groups=8,
    addition_embed_type="text", addition_embed_type_num_heads=4, resnet_time_scale_shift="scale_shift",
)
TEXT_CONFIG = dict(
    vocab_size=CLIP_VOCAB, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_HIDDEN, hidden_act="quick_gelu",
    bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False,
    set_alpha_to_one=False, steps_offset=0,
)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _split_conv(conv: torch.nn.Conv2d) -> None:
    """``conv`` (3 → 16 channels) writes ``(s·x_c, −s·x_c, L, −L)`` into group c (the spare group gets ``L, −L``)."""
    for c in range(3):
        conv.weight[4 * c, c, 1, 1] = VAE_SIGNAL
        conv.weight[4 * c + 1, c, 1, 1] = -VAE_SIGNAL
    for g in range(4):
        conv.bias[4 * g + 2], conv.bias[4 * g + 3] = VAE_LEVEL, -VAE_LEVEL


def _merge_head(norm: torch.nn.GroupNorm, conv: torch.nn.Conv2d) -> None:
    """GroupNorm scales each signal channel back to ±x; ``conv`` then takes silu(x) − silu(−x) = x."""
    gamma = VAE_LEVEL / (2.0**0.5 * VAE_SIGNAL)  # the group's std is ≈ L/√2
    for c in range(3):
        norm.weight[4 * c] = norm.weight[4 * c + 1] = gamma
        conv.weight[c, 4 * c, 1, 1], conv.weight[c, 4 * c + 1, 1, 1] = 1.0, -1.0


def make_pixel_vae():  # noqa: ANN201 - diffusers type
    """An ``AutoencoderKL`` that maps pixels in [-1, 1] to themselves (relative error ≲ 2e-4).

    Every ResNet's last conv is zero, so each block is the identity (residual path only). The
    encoder's ``conv_in`` splits each channel into ±x next to a large constant pair, so the final
    GroupNorm divides by an almost constant std; SiLU(x) − SiLU(−x) = x undoes the nonlinearity.
    The posterior log-variance is −20, so ``latent_dist.sample()`` equals its mean.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CONFIG)
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for part in (vae.encoder, vae.decoder):
            _split_conv(part.conv_in)
            _merge_head(part.conv_norm_out, part.conv_out)
        vae.encoder.conv_out.bias[3:] = VAE_LOGVAR
        eye = torch.eye(2 * LATENT_CHANNELS)[:, :, None, None]
        vae.quant_conv.weight.copy_(eye)
        vae.post_quant_conv.weight.copy_(eye[:LATENT_CHANNELS, :LATENT_CHANNELS])
    return vae.eval().requires_grad_(False)


def make_unet(seed: int):  # noqa: ANN201
    from diffusers import UNet2DConditionModel

    with seeded(seed):
        return UNet2DConditionModel(**UNET_CONFIG)


def make_text_encoder(seed: int):  # noqa: ANN201
    from transformers import CLIPTextConfig, CLIPTextModel

    with seeded(seed):
        return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def make_scheduler():  # noqa: ANN201
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assemble_pipeline(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                      tokenizer: object, scheduler: object | None = None):  # noqa: ANN201
    """A ``StableDiffusionPipeline`` from in-memory components (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler or make_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
