"""``bench/diffusion_judge.py``: the diffusion model as judge reads the concepts in real toy-world renders."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.train._toy import load_toy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import diffusion_judge as J  # noqa: E402


@pytest.fixture(scope="module")
def toy():  # noqa: ANN201
    return load_toy(["star", "purple", "striped"])


def _refs(world, concept: str, n: int = 8) -> tuple[np.ndarray, list[str]]:  # noqa: ANN001
    items = world.reference_images([concept], n, 0)[concept]
    return np.stack([np.asarray(img) for img, _ in items]), [cap for _, cap in items]


def test_each_lora_explains_renders_of_its_own_concept_best(toy):
    world, pipe, _, experts = toy
    for i, concept in enumerate(("star", "striped")):
        images, captions = _refs(world, concept)
        assert all(concept in c for c in captions)
        gains = J.lora_gains(pipe, images, captions, experts, seed=0).mean(0)  # star, purple, striped
        own = {"star": 0, "striped": 2}[concept]
        assert gains[own] > 0 and gains[own] == max(gains), (concept, gains)
        if i == 0:  # same seed, same noise: the same judgement; the weakest LoRA's gain is the score
            again = J.lora_gains(pipe, images, captions, experts, seed=0)
            assert np.array_equal(again.mean(0), gains)
            assert J.judge_score(again) == pytest.approx(float(again.min(1).mean()))
            assert J.judge_score(again) < gains[own]


def test_a_lora_scaled_to_zero_gains_exactly_nothing(toy):
    world, pipe, _, experts = toy
    images, captions = _refs(world, "star", 3)
    zero = dataclasses.replace(experts[0], factors={k: dataclasses.replace(f, scale_override=0.0)
                                                    for k, f in experts[0].factors.items()})
    assert np.array_equal(J.lora_gains(pipe, images, captions, [zero], seed=3), np.zeros((3, 1), np.float32))
