"""The toy text-to-image model's components and their configurations (diffusers / transformers classes).

* VAE: ``AutoencoderKL``, 2 levels (2× downscale), widths 16/32, 4 latent channels, no attention;
  32×32×3 images ↔ 16×16×4 latents.
* UNet: ``UNet2DConditionModel`` on 16×16×4 latents, widths 32/64/64, one res block per level,
  cross-attention (4 heads) at 8×8, 4×4 and the middle; cross-attention dim 64.
* Text encoder: ``CLIPTextModel``, 2 layers, hidden 64, 4 heads, the full CLIP vocabulary (49408)
  so the standard CLIP tokenizer works.
* Scheduler: DDIM with a linear β schedule (1e-4 → 0.02, 1000 steps), ε-prediction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .world import SIZE

LATENT_CHANNELS = 4
VAE_DOWN = 2
LATENT_SIZE = SIZE // VAE_DOWN
TEXT_HIDDEN = 64
CLIP_VOCAB = 49408
BOS_ID, EOS_ID = 49406, 49407

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
    latent_channels=LATENT_CHANNELS, norm_num_groups=8, sample_size=SIZE, mid_block_add_attention=False,
)
UNET_CONFIG = dict(
    sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
    block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4, norm_num_groups=8,
)
TEXT_CONFIG = dict(
    vocab_size=CLIP_VOCAB, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_HIDDEN, hidden_act="quick_gelu",
    bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def make_vae(seed: int):  # noqa: ANN201 - diffusers type
    from diffusers import AutoencoderKL

    with seeded(seed):
        return AutoencoderKL(**VAE_CONFIG)


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
