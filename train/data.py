"""Reference images and their prompts: a folder, flat or one sub-folder per concept.

Captions come from a same-name ``.txt`` beside the image, else the folder's ``prompt.txt``,
else the global prompt. Any image size: resized so the short side is the training resolution,
then center-cropped (or random-cropped in latent space when caching).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mole_core import MoleError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Reference:
    """One reference image with its prompt and concept (sub-folder name, or "" when flat)."""

    path: Path | None
    caption: str
    concept: str
    image: Image.Image | None = None


def _read_text(p: Path) -> str | None:
    return p.read_text(encoding="utf-8").strip() if p.is_file() else None


def scan_folder(root: str | Path, prompt: str = "", name: str = "reference folder",
                prompt_name: str = "a global prompt") -> list[Reference]:
    """List reference images under ``root`` with their captions; one-line errors when unusable, naming the
    folder as ``name`` and the global prompt as ``prompt_name`` (the CLI passes its flags)."""
    root = Path(root)
    if not root.is_dir():
        raise MoleError(f"{name} {root}: not a directory")
    refs: list[Reference] = []
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        folder_prompt = _read_text(folder / "prompt.txt")
        concept = "" if folder == root else folder.name
        for img in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption = _read_text(img.with_suffix(".txt")) or folder_prompt or _read_text(root / "prompt.txt") or prompt
            if not caption:
                raise MoleError(f"{img}: no caption (.txt beside it), folder prompt.txt or {prompt_name}")
            refs.append(Reference(img, caption, concept))
    if not refs:
        raise MoleError(f"{name} {root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    return refs


def load_image(ref: Reference) -> Image.Image:
    if ref.image is not None:
        return ref.image.convert("RGB")
    try:
        with Image.open(ref.path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise MoleError(f"{ref.path}: unreadable image ({exc.__class__.__name__})") from None


def to_tensor(img: Image.Image, resolution: int, crop: bool = True) -> torch.Tensor:
    """Resize so the short side is ``resolution`` (sizes rounded to multiples of 8), then
    center-crop to a square when ``crop``. Returns ``(3, H, W)`` in [-1, 1]."""
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s / 8) * 8), max(resolution, round(h * s / 8) * 8)
    img = img.resize((nw, nh), Image.BICUBIC)
    if crop:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def references_from_images(images: torch.Tensor, prompts: list[str]) -> list[Reference]:
    """Build references from an image batch ``(B, H, W, 3)`` in [0, 1] (ComfyUI IMAGE) and prompts."""
    if images.shape[0] == 0:
        raise MoleError("the reference image batch is empty")
    if len(prompts) == 1:
        prompts = prompts * images.shape[0]
    if len(prompts) != images.shape[0]:
        raise MoleError(f"got {len(prompts)} prompts for {images.shape[0]} images (give one, or one per image)")
    out = []
    for i in range(images.shape[0]):
        arr = (images[i].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
        out.append(Reference(None, prompts[i], "", Image.fromarray(arr)))
    return out


@dataclass
class CachedSet:
    """Latents and conditioning of the references, computed once."""

    latents: list[torch.Tensor]       # each (C, h, w), maybe larger than the crop when random-cropping
    cond_index: list[int]             # reference → index into conds
    conds: list[dict[str, torch.Tensor]]  # per unique caption, batch dim 1
    captions: list[str]
    concepts: list[str]
    crop: int                         # latent crop size

    def __len__(self) -> int:
        return len(self.latents)

    def concept_names(self) -> list[str]:
        return sorted(set(self.concepts))
