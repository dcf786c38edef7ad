"""The toy CLIP as an image-text guide for the ``compose`` and ``clip`` objectives."""

from __future__ import annotations

from pathlib import Path

import torch

from .clip import ToyClip, load_toy_clip


class ToyClipGuide:
    """:class:`train.compose.ImageTextGuide` over a frozen :class:`ToyClip` (images in [-1, 1])."""

    def __init__(self, model: ToyClip):
        self.model = model.eval().requires_grad_(False)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] → unit embeddings ``(B, D)`` (differentiable in the images)."""
        return self.model.encode_image(images.float().clamp(-1, 1).to(self._device()))

    def texture_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] → the last convolutional block's features (the texture term's,
        :mod:`train.texture`)."""
        return self.model.conv_features(images.float().clamp(-1, 1).to(self._device()))

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(texts)


def load_toy_guide(path: str | Path, device: str = "cpu") -> ToyClipGuide:
    """The toy CLIP of ``path`` (safetensors) as a guide on ``device``."""
    return ToyClipGuide(load_toy_clip(path).to(device))
