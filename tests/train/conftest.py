"""Fixtures for trainer tests: a tiny SD1.5 backend, random experts, reference folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.oracle import load_pipeline

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def blob(color: tuple[int, int, int], seed: int, size: int = 64) -> Image.Image:
    """A coloured disc at a random place on a light background."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 235, np.uint8)
    r = int(rng.integers(size // 6, size // 3))
    cy, cx = rng.integers(r, size - r, 2)
    yy, xx = np.mgrid[:size, :size]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = color
    return Image.fromarray(img)


def write_refs(root: Path, n: int = 2, size: int = 64) -> Path:
    """One sub-folder per colour with a prompt.txt; one image also gets its own caption file."""
    for name, color in COLORS.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "prompt.txt").write_text(f"a photo of a {name} ball")
        for s in range(n):
            blob(color, s * 11 + len(name), size).save(d / f"{s}.png")
    (root / "red" / "0.txt").write_text("a red ball, close up")
    return root


@pytest.fixture(scope="session")
def refs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_refs(tmp_path_factory.mktemp("refs"))


@pytest.fixture
def backend(tiny_sd15: dict):
    from train.diffusers_backend import DiffusersBackend

    return DiffusersBackend(load_pipeline(tiny_sd15), resolution=64)
