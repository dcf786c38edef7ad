"""CLIP evaluation of generated images: text alignment and per-concept image alignment.

Both are reported as raw cosine and as CLIPScore ``2.5 · max(cos, 0)`` (the scale of the MoLE
paper's tables: ≈0.75 where raw cosine is ≈0.30).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mole_core import MoleError

from .data import IMAGE_SUFFIXES, Reference, load_image, scan_folder, to_tensor
from .objectives import ClipGuide


def load_clip(checkpoint: str | Path, arch: str = "ViT-B-32", device: str = "cpu",
              names: tuple[str, str] = ("CLIP checkpoint", "CLIP architecture")) -> ClipGuide:
    """An open_clip model from a local ``.safetensors`` checkpoint (never downloads, never unpickles).

    ``arch`` is an open_clip model name or the path of a model-config JSON (custom architectures).
    ``names``: how errors name the checkpoint and the architecture inputs (a front end's own names)."""
    import open_clip

    if arch.endswith(".json"):
        if not Path(arch).is_file():
            raise MoleError(f"{names[1]} {arch}: config file not found")
        open_clip.add_model_config(arch)
        arch = Path(arch).stem
    p = Path(checkpoint)
    if not p.is_file():
        raise MoleError(f"{names[0]} {p}: file not found")
    if p.suffix != ".safetensors":
        raise MoleError(f"{names[0]} {p.name}: only .safetensors checkpoints are loaded")
    try:
        model = open_clip.create_model(arch, pretrained=str(p), device=device)
    except Exception as exc:  # open_clip raises RuntimeError/KeyError for mismatched files
        raise MoleError(f"{names[0]} {p.name}: not an open_clip {arch} checkpoint "
                        f"({str(exc).splitlines()[0][:160]})") from None
    return ClipGuide(model, open_clip.get_tokenizer(arch), model.visual.image_size[0]
                     if isinstance(model.visual.image_size, tuple) else model.visual.image_size)


def load_guide(checkpoint: str | Path, arch: str = "ViT-B-32", device: str = "cpu",  # noqa: ANN201
               names: tuple[str, str] = ("CLIP checkpoint", "CLIP architecture")):
    """An image-text guide: open_clip (:func:`load_clip`), or the toy world's CLIP when ``arch`` is ``toy``."""
    if arch != "toy":
        return load_clip(checkpoint, arch, device, names)
    from mole_toy.guide import load_toy_guide

    p = Path(checkpoint)
    if not p.is_file():
        raise MoleError(f"{names[0]} {p}: file not found")
    return load_toy_guide(p, device)


def clipscore(cos: float) -> float:
    return 2.5 * max(cos, 0.0)


def _images(folder: str | Path) -> list[Path]:
    p = Path(folder)
    if not p.is_dir():
        raise MoleError(f"{p}: not a directory")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MoleError(f"{p}: no images")
    return files


@torch.no_grad()
def evaluate_folder(guide: ClipGuide, images: str | Path, prompt: str, references: str | Path | None = None,
                    size: int = 224) -> dict:
    """Score every image of ``images`` against ``prompt`` and each concept folder of ``references``."""
    files = _images(images)
    embs = torch.cat([guide.embed_images(to_tensor(load_image(Reference(f, "", "")), size)[None]) for f in files])
    text = guide.embed_texts([prompt])[0]
    cos_t = (embs @ text).tolist()
    out: dict = {"images": len(files), "prompt": prompt,
                 "text_alignment": {"cosine": _mean(cos_t), "clipscore": _mean([clipscore(c) for c in cos_t])},
                 "image_alignment": {}}
    if references:
        refs = scan_folder(references, prompt="-", name="references folder")
        for concept in sorted({r.concept for r in refs}):
            members = [r for r in refs if r.concept == concept]
            ref = torch.cat([guide.embed_images(to_tensor(load_image(r), size)[None]) for r in members]).mean(0)
            ref = torch.nn.functional.normalize(ref, dim=-1)
            cos_i = (embs @ ref).tolist()
            out["image_alignment"][concept or "all"] = {"cosine": _mean(cos_i),
                                                         "clipscore": _mean([clipscore(c) for c in cos_i])}
    return out


def _mean(v: list[float]) -> float:
    return float(sum(v) / len(v)) if v else float("nan")
