"""The committed toy world loaded once per test module: pipeline, diffusers backend and concept experts."""

from __future__ import annotations

import pytest

import mole_core as mole
from mole_toy.api import DEFAULT_ASSETS


def load_toy(concepts: list[str]) -> tuple:
    """``(world, pipe, backend, experts)`` at the toy world's 32 px; fails with one line when unbuilt."""
    if not (DEFAULT_ASSETS / "manifest.json").is_file():
        pytest.fail(f"toy assets missing at {DEFAULT_ASSETS}: run `python -m mole_toy build`")
    from mole_toy import load_world
    from train.diffusers_backend import DiffusersBackend, quiet_libraries

    quiet_libraries()
    world = load_world()
    pipe = world.pipeline()
    return world, pipe, DiffusersBackend(pipe, resolution=32), mole.load_experts(world.expert_paths(concepts))
