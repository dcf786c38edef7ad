"""``load_world()``: the built toy world (pipeline, concept LoRAs, triggers, probe, toy CLIP) and its helpers."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from . import world as W
from .probes import Probe

if TYPE_CHECKING:
    from .clip import ToyClip

DEFAULT_ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class Composition:
    """A prompt that asks for several novel concepts; ``wanted`` is every attribute the probe should read."""

    prompt: str
    concepts: tuple[str, ...]
    wanted: dict[str, str] = field(hash=False)


@dataclass
class World:
    """Paths and helpers of a built toy world (see ``manifest.json`` for every measurement)."""

    root: Path
    manifest: dict
    probe: Probe

    @property
    def pipeline_dir(self) -> Path:
        return self.root / self.manifest["pipeline"]

    @property
    def concepts(self) -> list[W.Concept]:
        return [W.concept(name) for name in self.manifest["concepts"]]

    @property
    def lora_paths(self) -> dict[str, Path]:
        """Concept name → LoRA file (formats: ``manifest["concepts"][name]["format"]``)."""
        return {name: self.root / c["file"] for name, c in self.manifest["concepts"].items()}

    @property
    def triggers(self) -> dict[str, str]:
        return {name: c["trigger"] for name, c in self.manifest["concepts"].items()}

    @property
    def clip_path(self) -> Path | None:
        """The toy CLIP guide's file, or ``None`` when this world has none (``python -m mole_toy build-clip``)."""
        entry = self.manifest.get("clip")
        path = self.root / entry["file"] if entry else None
        return path if path is not None and path.is_file() else None

    def load_clip(self) -> ToyClip:
        """The toy CLIP guide (fp32, eval mode, frozen); raises ``FileNotFoundError`` when absent."""
        from .clip import load_toy_clip

        if self.clip_path is None:
            raise FileNotFoundError(f"{self.root}: no toy CLIP built; run `python -m mole_toy build-clip "
                                    f"--out {self.root}`")
        return load_toy_clip(self.clip_path)

    def expert_paths(self, concepts: list[str] | None = None) -> list[str]:
        """LoRA files in the order of ``concepts`` (default: all), ready for ``mole_core.load_experts``."""
        names = concepts or list(self.manifest["concepts"])
        return [str(self.lora_paths[n]) for n in names]

    def pipeline(self, dtype: torch.dtype = torch.float32, device: str = "cpu"):  # noqa: ANN201
        """A fresh ``StableDiffusionPipeline`` loaded offline from the assets."""
        from .build import load_pipeline

        return load_pipeline(self.pipeline_dir).to(device, dtype)

    def composition_prompts(self, k: int, per_set: int = 4, seed: int = 0,
                            concepts: list[str] | None = None) -> list[Composition]:
        """Prompts combining ``k`` novel concepts (every ``k``-subset of ``concepts``, default all),
        ``per_set`` variants each with base values for the other attributes."""
        return composition_prompts(k, per_set, seed, concepts or list(self.manifest["concepts"]))

    def reference_images(self, concepts: list[str] | None = None, n: int = 8, seed: int = 0
                         ) -> dict[str, list[tuple[Image.Image, str]]]:
        """Per concept, ``n`` generator images showing it alone, with their captions (gate-training references)."""
        return reference_images(concepts or list(self.manifest["concepts"]), n, seed)

    def write_reference_folder(self, folder: str | Path, concepts: list[str] | None = None, n: int = 8,
                               seed: int = 0) -> Path:
        return write_reference_folder(folder, concepts or list(self.manifest["concepts"]), n, seed)


def composition_prompts(k: int, per_set: int = 4, seed: int = 0, concepts: list[str] | None = None
                        ) -> list[Composition]:
    """See :meth:`World.composition_prompts` (works without built assets)."""
    names = concepts or [c.name for c in W.CONCEPTS]
    if not 1 <= k <= len(names):
        raise ValueError(f"`k` must be in 1..{len(names)}, got {k}")
    out = []
    for i, subset in enumerate(itertools.combinations(names, k)):
        values = W.concept_values(list(subset))
        for spec in W.sample_specs(per_set, seed * 1000 + i, values):
            out.append(Composition(W.caption(spec), tuple(subset), spec.attributes))
    return out


def reference_images(concepts: list[str], n: int = 8, seed: int = 0) -> dict[str, list[tuple[Image.Image, str]]]:
    """See :meth:`World.reference_images`."""
    refs = {}
    for i, name in enumerate(concepts):
        specs = W.sample_specs(n, seed * 1000 + 500 + i, W.concept_values([name]))
        refs[name] = list(W.iter_images(specs))
    return refs


def write_reference_folder(folder: str | Path, concepts: list[str], n: int = 8, seed: int = 0) -> Path:
    """One sub-folder per concept with ``NNN.png`` images and same-name ``.txt`` captions."""
    root = Path(folder)
    for name, items in reference_images(concepts, n, seed).items():
        sub = root / name
        sub.mkdir(parents=True, exist_ok=True)
        for j, (img, cap) in enumerate(items):
            img.save(sub / f"{j:03d}.png")
            (sub / f"{j:03d}.txt").write_text(cap + "\n", encoding="utf-8")
    return root


def load_world(assets_dir: str | Path | None = None) -> World:
    """The toy world built into ``assets_dir`` (default ``mole_toy/assets``).

    Raises:
        FileNotFoundError: no ``manifest.json`` there (build it: ``python -m mole_toy build``).
    """
    root = Path(assets_dir) if assets_dir is not None else DEFAULT_ASSETS
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no toy world built there; run `python -m mole_toy build --out {root}`")
    manifest = json.loads(path.read_text())
    return World(root=root, manifest=manifest, probe=Probe(root / manifest["probe"]["shape_net"]))


def images_to_array(images: list[Image.Image]) -> np.ndarray:
    """PIL images → ``(N, H, W, 3)`` uint8."""
    return np.stack([np.asarray(im.convert("RGB")) for im in images])
