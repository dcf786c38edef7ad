"""The block search's texture term (issue #12): how close an image's texture statistics are to the named concepts'.

An image-text guide reads a texture word from stripes that are regular, broken or crossed almost alike (on the toy
world's striped + star, eight toy-CLIP judges scored the hand-set candidates within 0.05 of each other where the
probes read 0.58-0.83). The Gram matrix of a convolutional layer's features — their channel correlations pooled over
positions, the texture statistics of Gatys et al. — does tell them apart: its distance to the striped references'
mean Gram matrix followed the probes (rank correlation 0.64 on those candidates), and added to the dark-view score
at weight 0.05-0.2 it lifted block_routing's pick for the triple from 0.41 to 0.53 (alone it ignores whether the
composition is there: 0.20 / 0.00). In the composition benchmark the compose recipe's search with it at 0.1 lifted
pairs from 0.845 to 0.87 (striped + star 0.56 → 0.62), every other target kept. The term, per image: the mean over
the concepts its prompt names of ``-‖G(image) − Ḡ_c‖_F / ‖Ḡ_c‖_F`` (higher is closer), ``Ḡ_c`` the mean Gram matrix
of concept ``c``'s references.
"""

from __future__ import annotations

from typing import Protocol

import torch

from mole_core import MoleError


class TexturedGuide(Protocol):
    """An image-text guide that also exposes a convolutional feature map (for the texture term)."""

    def texture_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] → features ``(B, C, h, w)``."""


def gram(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` → ``(B, C, C)``: ``F Fᵀ / (h w)`` per image, ``F`` the ``(C, h w)`` feature matrix."""
    f = features.float().flatten(2)
    return f @ f.transpose(1, 2) / f.shape[-1]


def check_textured(guide: object) -> None:
    """One-line error unless ``guide`` has ``texture_features`` (the toy CLIP, or an open_clip model)."""
    if not callable(getattr(guide, "texture_features", None)):
        raise MoleError(f"`search_texture_weight` needs a guide with texture features (the toy CLIP or an open_clip "
                        f"model), got {type(guide).__name__}")


@torch.no_grad()
def reference_grams(guide: TexturedGuide, images: list[torch.Tensor], concepts: list[str]
                    ) -> dict[str, torch.Tensor]:
    """Mean Gram matrix ``(C, C)`` of each concept's reference images (``(3, H, W)`` in [-1, 1] each)."""
    grams = torch.cat([gram(guide.texture_features(img[None])) for img in images])
    return {c: grams[[i for i, k in enumerate(concepts) if k == c]].mean(0) for c in sorted(set(concepts))}


@torch.no_grad()
def texture_scores(guide: TexturedGuide, images: torch.Tensor, named: list[list[str]],
                   ref_grams: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per image (``(B, 3, H, W)`` in [-1, 1]), the mean over the concepts ``named[i]`` of
    ``-‖G(image) − Ḡ_c‖_F / ‖Ḡ_c‖_F`` (0 for an image whose prompt names none)."""
    grams = gram(guide.texture_features(images))
    out = []
    for g, concepts in zip(grams, named):
        refs = [ref_grams[c].to(g.device) for c in concepts]
        dist = [torch.linalg.matrix_norm(g - ref) / torch.linalg.matrix_norm(ref) for ref in refs]
        out.append(-torch.stack(dist).mean() if dist else g.new_zeros(()))
    return torch.stack(out)
