"""Gate training does what MoLE claims on concept-specific experts (the toy world's concept LoRAs).

Three experts whose reference sets are distinct (a new colour, a new background, a new shape), the
denoise objective, block gates: the learned gates lower the held-out denoising loss below the NLA
starting point for every concept (gates that read the prompt; gates that read the block input beat NLA
on average and on two of the three concepts), differ between the concepts' prompts (input-dependent),
and the balance loss keeps the mean gates more even (higher entropy) than training without it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import mole_core as mole
from tests.train._toy import load_toy
from train.config import TrainConfig
from train.data import Reference
from train.engine import evaluate_denoise, gate_statistics, reference_cache, train

CONCEPTS = ["purple", "pink", "star"]
CFG = dict(steps=80, lr=3e-2, resolution=32, batch_size=8, checkpoint_every=0, seed=0)


def _refs(world, seed: int, n: int) -> list[Reference]:  # noqa: ANN001
    return [Reference(None, cap, name, img) for name, items in world.reference_images(CONCEPTS, n, seed).items()
            for img, cap in items]


@pytest.fixture(scope="module")
def setup():  # noqa: ANN201
    world, _, backend, experts = load_toy(CONCEPTS)
    cfg = TrainConfig(**CFG)
    train_cache = reference_cache(backend, experts, _refs(world, 0, 8), cfg)
    held_out = reference_cache(backend, experts, _refs(world, 7, 6), cfg)
    recipes = {"input": dict(alpha=0.5), "input_no_balance": dict(alpha=0.0), "prompt": dict(alpha=0.5,
                                                                                              gate_input="prompt")}
    runs = {name: train(TrainConfig(**CFG, **kw), backend, experts, _refs(world, 0, 8), cache=train_cache)
            for name, kw in recipes.items()}
    return world, backend, experts, held_out, runs


def _held_out_loss(backend, experts, held_out, gates=None) -> dict[str, float]:  # noqa: ANN001
    comps = gates.components() if gates is not None else ["unet"]
    mixes = [mole.attach(backend.mixture_target(), experts, gates=gates, components=comps) if gates is not None
             else mole.attach(backend.mixture_target(), experts, mode="uniform", components=["unet"])]
    try:
        return evaluate_denoise(backend, held_out, draws=16, seed=99)
    finally:
        for m in mixes:
            m.detach()


@pytest.fixture(scope="module")
def held_out_losses(setup):  # noqa: ANN001, ANN201
    _, backend, experts, held_out, runs = setup
    losses = {"nla": _held_out_loss(backend, experts, held_out)}
    losses.update({name: _held_out_loss(backend, experts, held_out, runs[name].gates) for name in ("input", "prompt")})
    print(f"\nheld-out denoising loss per concept: {losses}")
    return losses


def test_prompt_gates_beat_nla_on_held_out_loss_for_every_concept(held_out_losses) -> None:  # noqa: ANN001
    nla, learned = held_out_losses["nla"], held_out_losses["prompt"]
    assert set(nla) == set(learned) == set(CONCEPTS)
    for c in CONCEPTS:
        assert learned[c] < nla[c], (c, learned, nla)
    assert np.mean(list(learned.values())) < 0.8 * np.mean(list(nla.values())), (learned, nla)


def test_learned_gates_lower_the_mean_held_out_loss_below_nla(held_out_losses) -> None:  # noqa: ANN001
    nla, learned = held_out_losses["nla"], held_out_losses["input"]
    assert set(nla) == set(learned) == set(CONCEPTS)
    assert np.mean(list(learned.values())) < 0.9 * np.mean(list(nla.values())), (learned, nla)
    assert sum(learned[c] < nla[c] for c in CONCEPTS) >= 2, (learned, nla)


@pytest.mark.xfail(strict=True, reason="known limit of gate_input 'input': pooled block-input gates specialise per "
                   "block but barely per prompt, favouring the LoRAs with the largest effect (purple, pink); star's "
                   "held-out loss ends above NLA (0.114 vs 0.104); gate_input 'prompt' passes (0.097)")
def test_block_input_gates_beat_nla_on_held_out_loss_for_every_concept(held_out_losses) -> None:  # noqa: ANN001
    nla, learned = held_out_losses["nla"], held_out_losses["input"]
    for c in CONCEPTS:
        assert learned[c] < nla[c], (c, learned, nla)


def _mean_gate(stats: dict) -> np.ndarray:
    return np.mean(np.array(list(stats["mean"].values())), axis=0)


@pytest.mark.parametrize("recipe", ["input", "prompt"])
def test_gates_depend_on_the_concept_prompted(setup, recipe) -> None:  # noqa: ANN001
    world, backend, experts, _, runs = setup
    cfg = TrainConfig(**CFG)
    per_concept = {}
    for c in CONCEPTS:
        refs = [Reference(None, cap, c, img) for img, cap in world.reference_images([c], 4, seed=3)[c]]
        cache = reference_cache(backend, experts, refs, cfg)
        per_concept[c] = _mean_gate(gate_statistics(backend, experts, runs[recipe].gates, cache))
    for i, a in enumerate(CONCEPTS):
        for b in CONCEPTS[i + 1:]:
            assert np.abs(per_concept[a] - per_concept[b]).max() > 0.02, per_concept
    # each concept's own expert gets more gate mass on its own prompts than on the other concepts' prompts
    for i, c in enumerate(CONCEPTS):
        others = [per_concept[o][i] for o in CONCEPTS if o != c]
        assert per_concept[c][i] > max(others), (c, per_concept)


def _entropy(q: np.ndarray) -> float:
    q = np.clip(q, 1e-12, 1.0)
    return float(-(q * np.log(q)).sum())


def test_balance_loss_keeps_mean_gates_more_even(setup) -> None:  # noqa: ANN001
    _, backend, experts, held_out, runs = setup
    with_balance, without = (_entropy(_mean_gate(gate_statistics(backend, experts, runs[r].gates, held_out)))
                             for r in ("input", "input_no_balance"))
    assert with_balance > without
    assert with_balance <= math.log(len(CONCEPTS)) + 1e-6
