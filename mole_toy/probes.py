"""Attribute probes: read background, colour, texture and shape back from a 32×32 image.

* background: median of the 1-px border ring, nearest background palette colour (RGB distance);
* foreground: pixels farther than ``FG_DIST`` from that background colour;
* colour: median chromaticity ``rgb / sum(rgb)`` of the foreground core (textures only darken a colour,
  which leaves chromaticity unchanged), nearest palette chromaticity;
* texture: frequency content of the core's brightness (normalised by its bright level): the share of
  dark pixels separates ``plain``; the power spectrum's anisotropy separates ``striped`` (one
  direction) from ``dotted`` (a lattice);
* shape: a tiny CNN (:class:`ShapeNet`) on the soft foreground mask, trained on generator ground truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .world import ATTRIBUTES, BACKGROUNDS, COLOURS, SHAPES, SIZE

FG_DIST = 35.0  # RGB distance from the background beyond which a pixel is foreground
SOFT_RAMP = (15.0, 55.0)  # soft mask: 0 below, 1 above these distances
DARK_SPLIT = 0.77  # brightness (relative to the bright level) below which a core pixel is "dark"
PLAIN_MAX_DARK = 0.05  # at most this share of dark core pixels: plain
STRIPE_MIN_ANISO = 0.35  # spectral anisotropy above which a textured shape is striped
NONE = "none"


def as_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """``(H, W, 3)`` float64 in [0, 255] from a PIL image, uint8/float array or ``(3, H, W)`` tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 3 and t.shape[0] == 3:
            t = t.permute(1, 2, 0)
        return t.clamp(0, 1).numpy().astype(np.float64) * 255.0
    arr = np.asarray(image)
    return arr.astype(np.float64) * (255.0 if arr.dtype.kind == "f" and arr.max() <= 1.0 else 1.0)


def _nearest(value: np.ndarray, palette: dict[str, np.ndarray]) -> str:
    return min(palette, key=lambda k: float(np.sum((palette[k] - value) ** 2)))


def border_colour(img: np.ndarray) -> np.ndarray:
    """Median RGB of the outermost pixel ring."""
    ring = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    return np.median(ring, axis=0)


def background(img: np.ndarray) -> str:
    bg = border_colour(img)
    return _nearest(bg, {k: np.asarray(v, np.float64) for k, v in BACKGROUNDS.items()})


def soft_mask(img: np.ndarray, bg: np.ndarray | None = None) -> np.ndarray:
    """``(H, W)`` in [0, 1]: a linear ramp of the RGB distance to the background over ``SOFT_RAMP``."""
    lo, hi = SOFT_RAMP
    return np.clip((bg_distance(img, bg) - lo) / (hi - lo), 0.0, 1.0)


def bg_distance(img: np.ndarray, bg: np.ndarray | None = None) -> np.ndarray:
    """``(H, W)`` RGB distance of each pixel to the background colour (border median by default)."""
    bg = border_colour(img) if bg is None else bg
    return np.sqrt(np.sum((img - bg) ** 2, axis=-1))


def _erode(mask: np.ndarray) -> np.ndarray:
    """3×3 binary erosion."""
    p = np.pad(mask, 1, constant_values=False)
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= p[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return out


def core_mask(img: np.ndarray) -> np.ndarray:
    """Foreground pixels not on the shape's edge (falls back to the whole foreground when tiny)."""
    fg = bg_distance(img) > FG_DIST
    core = _erode(fg)
    return core if core.sum() >= 12 else fg


_CHROMA = {k: np.asarray(v, np.float64) / sum(v) for k, v in COLOURS.items()}


def colour(img: np.ndarray, core: np.ndarray | None = None) -> str:
    core = core_mask(img) if core is None else core
    if core.sum() < 4:
        return NONE
    px = img[core] + 1.0
    chroma = np.median(px / px.sum(axis=1, keepdims=True), axis=0)
    return _nearest(chroma, _CHROMA)


def texture_features(img: np.ndarray, core: np.ndarray | None = None) -> tuple[float, float]:
    """``(dark share, spectral anisotropy)`` of the core's brightness.

    Brightness is ``sum(rgb)`` divided by the core's 90th percentile. Anisotropy compares the power
    of the mean-removed brightness spectrum along its strongest direction pair (0°/90° vs 45°/135°
    lattices count as one lattice) against the rest: ~1 for stripes, ~0 for a square dot lattice.
    """
    core = core_mask(img) if core is None else core
    if core.sum() < 12:
        return 0.0, 0.0
    lum = img.sum(axis=-1)
    bright = np.percentile(lum[core], 90) + 1e-6
    rel = lum / bright
    dark = float(np.mean(rel[core] < DARK_SPLIT))
    sig = np.where(core, rel - rel[core].mean(), 0.0)
    power = np.abs(np.fft.fft2(sig)) ** 2
    fy = np.fft.fftfreq(img.shape[0])[:, None]
    fx = np.fft.fftfreq(img.shape[1])[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    band = (radius > 0.09) & (radius < 0.35)  # periods 3–11 px
    ang = np.mod(np.degrees(np.arctan2(fy, fx)) + 180.0, 180.0) + 0 * fx
    sectors = [(np.abs(((ang - a + 90) % 180) - 90) < 22.5) & band for a in (0, 45, 90, 135)]
    energy = np.array([power[s].sum() for s in sectors]) + 1e-9
    top = energy.max()
    aniso = float((top - np.sort(energy)[-2]) / (energy.sum()))
    return dark, aniso


def texture(img: np.ndarray, core: np.ndarray | None = None) -> str:
    core = core_mask(img) if core is None else core
    if core.sum() < 12:
        return NONE
    dark, aniso = texture_features(img, core)
    if dark <= PLAIN_MAX_DARK:
        return "plain"
    return "striped" if aniso >= STRIPE_MIN_ANISO else "dotted"


# ----- shape classifier -----

class ShapeNet(nn.Module):
    """Tiny CNN: soft foreground mask ``(N, 1, 32, 32)`` → shape logits ``(N, len(SHAPES))``."""

    def __init__(self, width: int = 16, classes: int = len(SHAPES)) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * (SIZE // 8) ** 2, 64), nn.ReLU(),
                                  nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def mask_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """Soft masks of ``(H, W, 3)`` images as ``(N, 1, 32, 32)`` float32."""
    return torch.from_numpy(np.stack([soft_mask(im) for im in images])[:, None].astype(np.float32))


def load_shape_net(path: str | Path) -> ShapeNet:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    net = ShapeNet(width=int(sd["features.0.weight"].shape[0]))
    net.load_state_dict({k: v.float() for k, v in sd.items()})
    return net.eval()


class Probe:
    """Reads every attribute from an image; ``probe(image) -> {attribute: value}``."""

    def __init__(self, shape_net: ShapeNet | str | Path | None) -> None:
        if shape_net is not None and not isinstance(shape_net, ShapeNet):
            shape_net = load_shape_net(shape_net)
        self.shape_net = shape_net

    def shapes(self, images: list[np.ndarray]) -> list[str]:
        if self.shape_net is None:
            return [NONE] * len(images)
        with torch.no_grad():
            logits = self.shape_net(mask_tensor(images))
        return [SHAPES[i] for i in logits.argmax(dim=1).tolist()]

    def __call__(self, image: Image.Image | np.ndarray | torch.Tensor) -> dict[str, str]:
        return self.batch([image])[0]

    def batch(self, images: list) -> list[dict[str, str]]:
        """Probe several images at once (the CNN runs batched)."""
        arrays = [as_array(im) for im in images]
        out = []
        for img, shp in zip(arrays, self.shapes(arrays)):
            core = core_mask(img)
            empty = core.sum() < 4
            out.append({"colour": colour(img, core), "texture": texture(img, core),
                        "shape": NONE if empty else shp, "background": background(img)})
        return out

    def score(self, image: Image.Image | np.ndarray | torch.Tensor, wanted: dict[str, str]) -> dict:
        """Per wanted attribute whether the probe reads it, plus ``all`` (every one) and ``fraction``."""
        return score_prediction(self(image), wanted)


def score_prediction(pred: dict[str, str], wanted: dict[str, str]) -> dict:
    hits = {a: pred.get(a) == v for a, v in wanted.items()}
    return {**hits, "all": all(hits.values()), "fraction": sum(hits.values()) / max(1, len(hits)), "pred": pred}


def accuracy(preds: list[dict[str, str]], truths: list[dict[str, str]]) -> dict[str, float]:
    """Per-attribute accuracy and ``all`` (every attribute right) over paired predictions."""
    acc = {a: float(np.mean([p[a] == t[a] for p, t in zip(preds, truths)])) for a in ATTRIBUTES if a in truths[0]}
    acc["all"] = float(np.mean([all(p[a] == t[a] for a in t) for p, t in zip(preds, truths)]))
    return acc
