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


def load_compose_toy(concepts: list[str], sizes: tuple[int, ...], refs_per_concept: int) -> tuple:
    """``(world, pipe, backend, experts, refs, prompts, guide)`` for objective compose: ``refs_per_concept``
    references per concept, 2 composition prompts per ``sizes``-subset of ``concepts``, three base prompts and
    the toy CLIP guide."""
    import itertools

    from mole_toy.guide import load_toy_guide
    from train.compose import ComposePrompts
    from train.data import Reference

    world, pipe, backend, experts = load_toy(concepts)
    refs = [Reference(None, cap, name, img) for name, items in
            world.reference_images(concepts, refs_per_concept, 0).items() for img, cap in items]
    comps = [c.prompt for k in sizes for sub in itertools.combinations(concepts, k)
             for c in world.composition_prompts(k, per_set=2, seed=5, concepts=list(sub))]
    base = ["a red circle on grey", "a blue dotted square on white", "a green triangle on black"]
    return world, pipe, backend, experts, refs, ComposePrompts(comps, base), load_toy_guide(world.clip_path)
