"""Training objectives: the denoiser's own loss and CLIP guidance on the predicted x0.

Each objective maps a :class:`StepContext` to named, already-weighted loss terms. The gating
balance loss (α · Eq. 14–15) is added by the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mole_core import MoleError

from .backend import Backend, predicted_x0, training_target
from .config import TrainConfig


@dataclass
class StepContext:
    """Everything an objective may look at for one micro-batch."""

    backend: Backend
    cfg: TrainConfig
    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    out: torch.Tensor
    ref_index: torch.Tensor  # (B,) indices of the references in the cached set


def denoise_loss(ctx: StepContext) -> dict[str, torch.Tensor]:
    """MSE between the denoiser output and its own target (ε, v or x0)."""
    b = ctx.backend
    target = training_target(b.prediction_type, b.alphas_cumprod, ctx.x0, ctx.noise, ctx.t)
    return {"denoise": ctx.cfg.denoise_weight * F.mse_loss(ctx.out.float(), target.float())}


_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipGuide:
    """Frozen open_clip model scoring decoded x0 against reference images and prompts.

    Image–image: cosine to the mean embedding of the sample's concept references (all
    references when the folder is flat). Image–text: cosine to the sample's caption.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], image_size: int):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.ref_emb: torch.Tensor | None = None
        self.text_emb: torch.Tensor | None = None

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] → the model's input: resized to its image size, CLIP-normalised."""
        x = (images.float().clamp(-1, 1) + 1) / 2
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                          antialias=False)
        mean = torch.tensor(_CLIP_MEAN, device=x.device).reshape(1, 3, 1, 1)
        std = torch.tensor(_CLIP_STD, device=x.device).reshape(1, 3, 1, 1)
        return ((x - mean) / std).to(self._device())

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] → unit image embeddings ``(B, D)`` (differentiable)."""
        return F.normalize(self.model.encode_image(self._pixels(images)).float(), dim=-1)

    def texture_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] → the feature map ``(B, C, h, w)`` of the image tower's block a third of the
        way in (early enough to keep texture, late enough to see it; the texture term's, :mod:`train.texture`)."""
        feats = self.model.visual.forward_intermediates(self._pixels(images), intermediates_only=True)
        layers = feats["image_intermediates"]
        return layers[len(layers) // 3].float()

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(texts).to(self._device())).float(), dim=-1)

    @torch.no_grad()
    def prepare(self, ref_images: list[torch.Tensor], concepts: list[str], captions: list[str]) -> None:
        """Cache per-reference concept embeddings and caption embeddings."""
        embs = torch.cat([self.embed_images(img[None]) for img in ref_images])
        by_concept = {c: F.normalize(embs[[i for i, k in enumerate(concepts) if k == c]].mean(0), dim=-1)
                      for c in set(concepts)}
        self.ref_emb = torch.stack([by_concept[c] for c in concepts])
        self.text_emb = self.embed_texts(captions)


def make_clip_loss(guide: ClipGuide) -> Callable[[StepContext], dict[str, torch.Tensor]]:
    """CLIP guidance restricted to the low-noise window ``t/T < clip_max_t`` and a reduced decode size."""

    def clip_loss(ctx: StepContext) -> dict[str, torch.Tensor]:
        b, cfg = ctx.backend, ctx.cfg
        if guide.ref_emb is None or guide.text_emb is None:
            raise MoleError("CLIP guide used before prepare()")
        window = ctx.t.float() < cfg.clip_max_t * len(b.alphas_cumprod)
        zero = ctx.out.sum() * 0.0
        if not window.any():
            return {"clip_image": zero, "clip_text": zero}
        x0 = predicted_x0(b.prediction_type, b.alphas_cumprod, ctx.x_t[window], ctx.out[window], ctx.t[window])
        size = max(1, cfg.clip_decode_size // _latent_factor(b, ctx.x0))
        if x0.shape[-1] != size:
            x0 = F.interpolate(x0, size=(size, size), mode="bilinear", align_corners=False)
        emb = guide.embed_images(b.decode(x0))
        idx = ctx.ref_index[window].to(emb.device)
        cos_img = (emb * guide.ref_emb.to(emb.device)[idx]).sum(-1)
        cos_txt = (emb * guide.text_emb.to(emb.device)[idx]).sum(-1)
        frac = window.float().mean().to(emb.device)  # keep the term's scale independent of the window hit rate
        return {"clip_image": cfg.clip_image_weight * (1 - cos_img).mean() * frac,
                "clip_text": cfg.clip_text_weight * (1 - cos_txt).mean() * frac}

    return clip_loss


def _latent_factor(backend: Backend, x0: torch.Tensor) -> int:
    return int(getattr(backend, "vae_scale_factor", 8))


OBJECTIVE_BUILDERS: dict[str, Callable[..., Callable[[StepContext], dict[str, torch.Tensor]]]] = {
    "denoise": lambda **_: denoise_loss,
    "clip": lambda guide=None, **_: make_clip_loss(_need_guide(guide)),
}


def _need_guide(guide: Any) -> ClipGuide:
    if guide is None:
        raise MoleError("objective 'clip' needs an image-text guide (a local open_clip .safetensors)")
    return guide


def build_objectives(cfg: TrainConfig, guide: ClipGuide | None = None) -> list[Callable[[StepContext], dict]]:
    """Objective functions on the references for ``cfg.objective`` (``compose`` samples its own
    images: :class:`train.compose.ComposeObjective`)."""
    return [OBJECTIVE_BUILDERS[name](guide=guide) for name in cfg.objectives if name in OBJECTIVE_BUILDERS]
