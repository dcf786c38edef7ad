"""Block search (``block_search``): each LoRA switched off in the UNet stages where the guide scores the
compositions naming it higher without it.

Oracles: the greedy pass against a hand-computed score table, the switch against the gates' own magnitudes
(exactly ~0 in the stage's scopes, untouched elsewhere, undone bit for bit), and an end-to-end run on the toy world
whose gate file carries exactly the switches its training record reports."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch

import mole_core as mole
from tests.train._toy import load_compose_toy
from train.block_search import (
    OFF_LOGIT,
    can_carry,
    can_zero,
    floors,
    search_blocks,
    set_text_strengths,
    stage_of,
    switch_off,
    text_scopes,
    unet_stages,
    write_set_text_scales,
)
from train.compose import ComposeObjective, ComposePrompts
from train.config import TrainConfig
from train.engine import attach_for_training, train
from train.greedy import (
    GAINS,
    SHARE_STEPS,
    greedy_additions,
    greedy_search,
    greedy_shares,
    greedy_strengths,
    greedy_windows,
    mean_gain,
    share_moves,
    share_steps_up_to,
    win_gain,
)

CONCEPTS = ["purple", "striped", "star"]
RECIPE = dict(resolution=32, batch_size=4, seed=0, checkpoint_every=0, objective="compose", gate_family="sigmoid",
              gate_input="trigger", granularity="block", text_pool="max", train_text_gates=True, rollout_steps=2,
              lr=3e-2, route_weight=1.0, train_magnitudes=False, alpha=0.0)


@contextlib.contextmanager
def attached(backend, experts, cfg: TrainConfig) -> Iterator[tuple]:
    """The trainable and static mixtures :func:`attach_for_training` attaches, detached after the block however it
    ends (a failed assertion must not leave LoRA patches on the shared toy model)."""
    gated, static = attach_for_training(backend, experts, cfg)
    try:
        yield gated, static
    finally:
        for m in (gated, static):
            if m is not None:
                m.detach()


def test_stage_of_groups_unet_scopes_by_resolution_stage():
    assert stage_of("unet:down_blocks.1.attentions.0") == "unet:down_blocks.1"
    assert stage_of("unet:up_blocks.3.resnets.2") == "unet:up_blocks.3"
    assert stage_of("unet:mid_block.attentions.0") == "unet:mid_block"
    assert stage_of("unet:conv_in") == "unet:conv_in"
    assert stage_of("te1:text_model.encoder.layers.0") is None


def test_greedy_search_follows_the_score_table():
    """Switching expert 0 off in ``b`` helps the sets naming it by 1 each, in ``c`` hurts; expert 1 off in ``a``
    helps only the pair (+0.5) but costs its single 0.2: kept (+0.3). Expert 1 off in ``b`` gains 0: not kept."""
    gains = {(0, "b"): {frozenset({0}): 1.0, frozenset({0, 1}): 1.0}, (0, "c"): {frozenset({0}): -2.0},
             (1, "a"): {frozenset({0, 1}): 0.5, frozenset({1}): -0.2}}
    calls = []

    def score(named: frozenset[int], off: dict[int, frozenset[str]]) -> float:
        calls.append((named, off))
        return sum(gains.get((e, st), {}).get(named, 0.0) for e in named for st in off[e])

    sets = [frozenset({0}), frozenset({1}), frozenset({0, 1})]
    off, start, total, complete = greedy_search([0, 1], ["a", "b", "c"], sets, score)
    assert off == {0: frozenset({"b"}), 1: frozenset({"a"})}
    assert start == 0.0 and total == pytest.approx(2.3) and complete
    assert len(calls) == len(set(map(repr, calls)))  # every (set, switches) scored once

    def everywhere(named: frozenset[int], off: dict[int, frozenset[str]]) -> float:
        return float(sum(len(v) for v in off.values()))  # every switch helps

    off, _, _, _ = greedy_search([0], ["a", "b", "c"], [frozenset({0})], everywhere)
    assert off == {0: frozenset({"a", "b"})}  # never off in every stage
    asked = iter([False, True])  # stopped before the second candidate: the first switch kept
    off, _, total, complete = greedy_search([0], ["a", "b", "c"], [frozenset({0})], everywhere,
                                            should_stop=lambda: next(asked))
    assert off == {0: frozenset({"a"})} and total == 1.0 and not complete


def test_a_later_stage_pass_switches_a_stage_back_on_when_that_raises_the_score():
    """From ``start_off`` (expert 0 off in ``a`` and ``b``): ``a`` back on adds 0.4, ``b`` back on costs 0.1 (stays
    off), ``c`` off adds 0.2 — but only after ``a`` is back on, else it would be off everywhere."""
    def score(named: frozenset[int], off: dict[int, frozenset[str]]) -> float:
        return -0.4 * ("a" in off[0]) + 0.1 * ("b" in off[0]) + 0.2 * ("c" in off[0])

    off, start, total, complete = greedy_search([0], ["a", "b", "c"], [frozenset({0})], score,
                                                start_off={0: frozenset({"a", "b"})})
    assert off == {0: frozenset({"b", "c"})}
    assert start == pytest.approx(-0.3) and total == pytest.approx(0.3) and complete
    off, _, _, _ = greedy_search([0], ["b", "a", "c"], [frozenset({0})], score, start_off={0: frozenset({"a", "b"})})
    assert off == {0: frozenset({"b", "c"})}  # order of stages does not matter here: b stays off either way


def test_greedy_strengths_keeps_each_experts_best_rising_level():
    """Expert 0: level 2 adds 0.3 to each set naming it, level 3 adds 0.5 to the single but costs 0.4 on the pair
    (+0.1): 2 kept (+0.6). Expert 1: every level lowers the sets naming it: stays at 1. Expert 2 then sees expert
    0 at 2 (the pass is greedy in order)."""
    gains = {(0, 2.0): {frozenset({0}): 0.3, frozenset({0, 1}): 0.3}, (0, 3.0): {frozenset({0}): 0.5,
             frozenset({0, 1}): -0.4}, (1, 2.0): {frozenset({1}): -0.1}, (1, 3.0): {frozenset({0, 1}): -0.2},
             (2, 3.0): {frozenset({0, 2}): 0.2}}
    seen_by_2 = []

    def score(named: frozenset[int], levels: dict[int, float]) -> float:
        if 2 in named and 0 in named:
            seen_by_2.append(levels[0])
        return sum(gains.get((e, lv), {}).get(named, 0.0) for e, lv in levels.items())

    sets = [frozenset({0}), frozenset({1}), frozenset({0, 1}), frozenset({0, 2})]
    steps = []
    levels, start, total, complete = greedy_strengths([0, 1, 2], [2.0, 3.0], sets, score,
                                                      progress=lambda i, n: steps.append((i, n)))
    assert levels == {0: 2.0, 1: 1.0, 2: 3.0} and complete
    assert start == 0.0 and total == pytest.approx(0.6 + 0.2)  # 0.3 on two sets naming 0, then +0.2
    assert steps == [(i, 6) for i in range(6)] and seen_by_2[-1] == 2.0
    asked = iter([False, False, True])  # stopped at expert 1's first level: expert 0's choice kept
    levels, _, total, complete = greedy_strengths([0, 1, 2], [2.0, 3.0], sets, score, should_stop=lambda: next(asked))
    assert levels == {0: 2.0, 1: 1.0, 2: 1.0} and total == pytest.approx(0.6) and not complete


def test_a_held_back_draw_vetoes_flips_it_does_not_confirm_and_is_asked_only_about_rising_ones():
    """Expert 0 off in ``a`` raises the first draw (+1) but lowers the held-back one (−0.5): not kept; off in ``b``
    raises both (+1, +0.2): kept; off in ``c`` lowers the first draw: the held-back draw is never asked about it."""
    first = {"a": 1.0, "b": 1.0, "c": -1.0}
    second = {"a": -0.5, "b": 0.2, "c": 5.0}
    asked = []

    def score(named: frozenset[int], off: dict[int, frozenset[str]]) -> float:
        return sum(first[st] for st in off[0])

    def held(named: frozenset[int], off: dict[int, frozenset[str]]) -> float:
        asked.append(off[0])
        return sum(second[st] for st in off[0])

    sets = [frozenset({0})]
    off, start, total, complete = greedy_search([0], ["a", "b", "c"], sets, score, confirm=[held])
    assert off == {0: frozenset({"b"})} and start == 0.0 and total == 1.0 and complete
    assert set(asked) == {frozenset(), frozenset({"a"}), frozenset({"b"})}  # never a state with ``c`` off
    off, _, _, _ = greedy_search([0], ["a", "b", "c"], sets, score)
    assert off == {0: frozenset({"a", "b"})}  # without it both rising flips are kept

    def level_score(named: frozenset[int], levels: dict[int, float]) -> float:
        return {1.0: 0.0, 2.0: 0.3, 3.0: 0.5}[levels[0]]

    def level_held(named: frozenset[int], levels: dict[int, float]) -> float:
        return {1.0: 0.0, 2.0: 0.1, 3.0: -0.1}[levels[0]]

    levels, _, total, _ = greedy_strengths([0], [2.0, 3.0], sets, level_score, confirm=[level_held])
    assert levels == {0: 2.0} and total == pytest.approx(0.3)  # 3 rises more on the first draw, not on the second
    levels, _, _, _ = greedy_strengths([0], [3.0, 2.0], sets, level_score, confirm=[level_held])
    assert levels == {0: 2.0}  # in either order


def test_greedy_windows_reaches_a_window_single_flips_do_not():
    """Five stages: every single flip from all on lowers the score (−1), the window ``c``–``e`` raises it (+1) and
    ``c``–``d`` most (+2); anything else −5. Single flips stay at every stage on; the window pass moves the start
    to ``c``, then the end to ``d``, in 2 × stages candidates, an end before the start skipped (never scored).
    A held-back scorer that disagrees with the end move keeps ``c``–``e``."""
    stages = ["a", "b", "c", "d", "e"]
    table = {frozenset(): 0.0, frozenset("ab"): 1.0, frozenset("abe"): 2.0, **{frozenset(st): -1.0 for st in stages}}

    def score(named: frozenset[int], off: dict[int, frozenset[str]]) -> float:
        return table.get(off[0], -5.0)

    sets = [frozenset({0})]
    off, _, _, _ = greedy_search([0], stages, sets, score)
    assert off == {0: frozenset()}  # no single flip rises: stuck at every stage on
    seen, scored = [], []

    def spy(named: frozenset[int], off: dict[int, frozenset[str]]) -> float:
        scored.append(off[0])
        return score(named, off)

    off, start, total, complete = greedy_windows([0], stages, sets, spy, progress=lambda i, n: seen.append((i, n)))
    assert off == {0: frozenset("abe")} and start == 0.0 and total == 2.0 and complete
    assert seen == [(i, 10) for i in range(10)]
    assert frozenset("abcde") not in scored  # an end before the start is never tried

    def held(named: frozenset[int], off: dict[int, frozenset[str]]) -> float:
        return 0.0 if off[0] == frozenset("abe") else score(named, off)

    off, _, total, _ = greedy_windows([0], stages, sets, score, confirm=[held])
    assert off == {0: frozenset("ab")} and total == 1.0  # the start move holds on the held-back draw, the end not
    asked = iter([False, False, True])  # stopped at the third candidate: nothing kept yet (phases keep at their end)
    off, _, _, complete = greedy_windows([0], stages, sets, score, should_stop=lambda: next(asked))
    assert off == {0: frozenset()} and not complete


def test_win_gain_is_the_share_of_paired_samples_that_rise_less_the_share_that_fall():
    now = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5])
    trial = torch.tensor([0.6, 0.6, 0.5, -1.0, 0.4])  # 2 rise, 1 ties, 2 fall
    assert win_gain(trial, now) == 0.0
    assert win_gain(trial + torch.tensor([0, 0, 0.1, 0, 0]), now) == pytest.approx(1 / 5)
    assert win_gain(now, trial) == 0.0 and win_gain(now, now) == 0.0
    assert mean_gain(trial, now) == pytest.approx(float(trial.mean()) - 0.5)
    assert mean_gain(0.75, 0.25) == 0.5  # plain numbers (a set's mean) work too


def test_the_wins_aggregate_keeps_a_change_most_samples_prefer_where_the_mean_falls():
    """Switching the expert off in ``a`` raises three of four paired samples by 0.1 and drops one by 1 (mean −0.175);
    in ``b`` it raises one by 1 and drops three by 0.1 (mean +0.175); in ``c`` it changes nothing. By the mean only
    ``b`` is kept, by wins only ``a``, in single flips, windows and text levels alike; the totals stay the mean's."""
    base = torch.zeros(4)
    delta = {"a": torch.tensor([0.1, 0.1, 0.1, -1.0]), "b": torch.tensor([-0.1, -0.1, -0.1, 1.0]), "c": base}

    def score(named: frozenset[int], off: dict[int, frozenset[str]]) -> torch.Tensor:
        return base + sum((delta[st] for st in off[0]), torch.zeros(4))

    sets, stages = [frozenset({0})], ["a", "b", "c"]
    off, start, total, _ = greedy_search([0], stages, sets, score)
    assert off == {0: frozenset("b")} and start == 0.0 and total == pytest.approx(0.175)
    off, _, total, _ = greedy_search([0], stages, sets, score, compare=win_gain)
    assert off == {0: frozenset("a")} and total == pytest.approx(-0.175)
    off, _, _, _ = greedy_windows([0], stages, sets, score, compare=win_gain)
    assert off == {0: frozenset("a")}  # the start moves to ``b`` (runs in b–c); no end then wins more
    off, _, _, _ = greedy_windows([0], stages, sets, score)
    assert off == {0: frozenset("bc")}  # no start raises the mean; the end moves to ``a`` (runs in a only)
    levels = {2.0: delta["a"], 3.0: delta["b"]}

    def level_score(named: frozenset[int], lv: dict[int, float]) -> torch.Tensor:
        return levels.get(lv[0], base)

    assert greedy_strengths([0], [2.0, 3.0], sets, level_score)[0] == {0: 3.0}
    assert greedy_strengths([0], [2.0, 3.0], sets, level_score, compare=win_gain)[0] == {0: 2.0}
    held = lambda named, off: base - sum((delta[st] for st in off[0]), torch.zeros(4))  # noqa: E731
    off, _, _, _ = greedy_search([0], stages, sets, score, confirm=[held], compare=win_gain)
    assert off == {0: frozenset()}  # the held-back scorer is asked by wins too: it disagrees


@pytest.fixture(scope="module")
def toy():  # noqa: ANN201
    _, _, backend, experts, refs, prompts, guide = load_compose_toy(CONCEPTS, (1, 2), 2)
    return backend, experts, refs, prompts, guide


def test_switch_off_zeroes_one_experts_magnitude_in_one_stage_and_undoes_exactly(toy):
    backend, experts, _, _, _ = toy
    with attached(backend, experts, TrainConfig(**RECIPE)) as (gated, static):
        stages = unet_stages(gated)
        assert "unet:mid_block" in stages and len(stages) >= 5
        before = {s: gated.scope_gate(s).magnitude.detach().clone() for s in gated.scopes}
        undo = switch_off(gated, stages, {1: frozenset({"unet:mid_block"})})
        for s in gated.scopes:
            m = gated.scope_gate(s).magnitude.detach()
            if s in stages["unet:mid_block"]:
                assert m[1] < 1e-15 and torch.equal(m[[0, 2]], before[s][[0, 2]]), s
            else:
                assert torch.equal(m, before[s]), s
        undo()
        assert all(torch.equal(gated.scope_gate(s).magnitude.detach(), before[s]) for s in gated.scopes)


def _all_but_the_first_stage(gated: mole.Mixture) -> tuple[dict[str, list[str]], list[str], int, frozenset[str], int]:
    """The UNet's stages of ``gated`` (scopes per stage), their order, the number of gated UNet scopes, every stage
    but the first, and the number of scopes in those."""
    stages = unet_stages(gated)
    order = list(stages)
    most = frozenset(order[1:])
    return stages, order, sum(map(len, stages.values())), most, sum(len(stages[st]) for st in most)


def test_min_strength_runs_switched_off_stages_at_the_floor_that_keeps_the_mean_magnitude(toy):
    """``min_strength`` g: an expert switched off in stages holding ``n_off`` of the UNet's ``n`` gated scopes (every
    magnitude 1) runs there at (g·n − n_on) / n_off, clamped to [0, g] — hand-computed here from the scope counts —
    so its mean UNet magnitude is g; where the stages it keeps already give g, it is switched off (~0) as without."""
    backend, experts, _, _, _ = toy
    with attached(backend, experts, TrainConfig(**RECIPE)) as (gated, static):
        stages, order, n, most, n_off = _all_but_the_first_stage(gated)
        small = frozenset({"unet:mid_block"})
        want = (0.7 * n - (n - n_off)) / n_off
        assert 0 < want < 0.7 and len(stages["unet:mid_block"]) < 0.3 * n  # both cases below are exercised
        assert floors(gated, stages, {0: most, 2: small, 1: frozenset()}, 0.7) == \
            pytest.approx({0: want, 2: 0.0, 1: 0.0}, abs=1e-9)
        assert floors(gated, stages, {0: most, 2: small}, 0.0) == {0: 0.0, 2: 0.0}
        before = {s: gated.scope_gate(s).magnitude.detach().clone() for s in gated.scopes}
        undo = switch_off(gated, stages, {0: most, 2: small}, 0.7)
        unet = [s for sts in stages.values() for s in sts]
        mean0 = sum(float(gated.scope_gate(s).magnitude[0]) for s in unet) / n
        assert mean0 == pytest.approx(0.7, abs=1e-6)
        for s in gated.scopes:
            m = gated.scope_gate(s).magnitude.detach()
            if stage_of(s) in most:
                assert float(m[0]) == pytest.approx(want, abs=1e-6), s
            if s in stages["unet:mid_block"]:
                assert float(gated.scope_gate(s).magnitude_logit[2]) == OFF_LOGIT, s
            assert torch.equal(m[1], before[s][1]), s
        undo()
        assert all(torch.equal(gated.scope_gate(s).magnitude.detach(), before[s]) for s in gated.scopes)


def test_a_floor_at_or_above_m_max_is_a_one_line_error(toy):
    """Gates with m_max 0.5 (magnitudes 0.25) cannot hold a 0.7 floor: one line naming both, nothing changed."""
    backend, experts, _, _, _ = toy
    with attached(backend, experts, TrainConfig(**RECIPE, m_max=0.5, init_gate=0.1)) as (gated, static):
        stages = unet_stages(gated)
        before = {s: gated.scope_gate(s).magnitude.detach().clone() for s in gated.scopes}
        with pytest.raises(mole.MoleError, match=r"^block search floor 0.7 must be below the gates' m_max 0.5$"):
            switch_off(gated, stages, {0: frozenset(list(stages)[1:])}, 0.7)
        assert all(torch.equal(gated.scope_gate(s).magnitude.detach(), before[s]) for s in gated.scopes)


def test_zeroed_stages_move_the_floor_to_the_other_switched_off_stages(toy):
    """With ``zero``, an expert's switched-off stages outside ``zero`` carry its whole floor, (g·n − n_on) /
    (n_off − n_zero) — hand-computed from the scope counts, up to 1 — its ``zero`` stages run at ~0, its mean UNet
    magnitude stays g; :func:`can_zero` allows exactly the zeroings whose carried floor stays ≤ 1."""
    backend, experts, _, _, _ = toy
    with attached(backend, experts, TrainConfig(**RECIPE)) as (gated, _):
        stages, order, n, most, n_off = _all_but_the_first_stage(gated)
        zero = frozenset(order[1:3])
        n_zero = sum(len(stages[st]) for st in zero)
        want = (0.7 * n - (n - n_off)) / (n_off - n_zero)
        assert 0.7 * n - (n - n_off) > 0 and 0 < want <= 1  # a floor above 0 that two zeroed stages raise
        assert floors(gated, stages, {0: most}, 0.7, {0: zero}) == pytest.approx({0: want}, abs=1e-9)
        assert floors(gated, stages, {0: most}, 0.7, {0: frozenset()}) == floors(gated, stages, {0: most}, 0.7)
        before = {s: gated.scope_gate(s).magnitude.detach().clone() for s in gated.scopes}
        undo = switch_off(gated, stages, {0: most}, 0.7, {0: zero})
        unet = [s for sts in stages.values() for s in sts]
        assert sum(float(gated.scope_gate(s).magnitude[0]) for s in unet) / n == pytest.approx(0.7, abs=1e-6)
        for s in unet:
            logit = float(gated.scope_gate(s).magnitude_logit[0])
            if stage_of(s) in zero:
                assert logit == OFF_LOGIT, s
            elif stage_of(s) in most:
                assert float(gated.scope_gate(s).magnitude[0]) == pytest.approx(want, abs=1e-6), s
        undo()
        assert all(torch.equal(gated.scope_gate(s).magnitude.detach(), before[s]) for s in gated.scopes)
        need = 0.7 * n - (n - n_off)  # what the switched-off stages must carry in all
        for k in range(1, len(order) - 1):
            zs = frozenset(order[1:1 + k])
            carry = n_off - sum(len(stages[st]) for st in zs)
            assert can_zero(gated, stages, 0, most, zs, 0.7) == (carry > 0 and need / carry <= 1), k
        assert not can_zero(gated, stages, 0, most, most, 0.7)  # nothing left to carry it
        assert not can_zero(gated, stages, 0, most, frozenset(order[:1]), 0.7)  # not a switched-off stage
        assert not can_zero(gated, stages, 0, frozenset({"unet:mid_block"}), frozenset({"unet:mid_block"}), 0.7)
        assert not can_zero(gated, stages, 0, most, zero, 0.0)  # no floor to move


def test_can_zero_refuses_a_carried_floor_the_gates_cannot_hold(toy):
    """Gates with ``m_max`` 0.9: a zeroing whose other switched-off stages would have to carry the floor at 0.9 or
    more (≤ 1, so allowed with the default ``m_max`` 2) is refused — the search never writes a magnitude its gates
    cannot hold. Hand-computed from the gates' own magnitudes and the scope counts."""
    backend, experts, _, _, _ = toy
    with attached(backend, experts, TrainConfig(**RECIPE, m_max=0.9, init_gate=0.3)) as (gated, _):
        stages, order, n, most, n_off = _all_but_the_first_stage(gated)
        unet = [s for sts in stages.values() for s in sts]
        m = {s: float(gated.scope_gate(s).magnitude[0]) for s in unet}
        need = 0.7 * n - sum(m[s] for s in stages[order[0]])
        seen = set()
        for k in range(1, len(order) - 1):
            zs = frozenset(order[1:1 + k])
            carried = need / (n_off - sum(len(stages[st]) for st in zs))
            assert can_zero(gated, stages, 0, most, zs, 0.7) == (carried <= 1.0 and carried < 0.9), k
            seen.add(carried < 0.9)
        assert seen == {True, False}  # both sides of the bound are exercised


def test_greedy_additions_keeps_each_rounds_best_addition_whatever_the_stage_order():
    """Adding ``a`` raises the score by 1, ``b`` by 2, at most one fits (``allowed``): best improvement keeps ``b``
    in either stage order (first improvement in the order a, b would keep ``a``), and never scores what ``allowed``
    refuses; a held-back scorer on which ``b`` does not raise the score leaves ``a``. Expert 1's additions stack
    (``c`` then ``a``: +3, then +1 more) until none raises it; progress steps through every possible round once."""
    table = {frozenset({"a"}): 1.0, frozenset({"b"}): 2.0, frozenset({"c"}): 3.0, frozenset({"a", "c"}): 4.0}

    scored = []

    def score(named: frozenset[int], chosen: dict[int, frozenset[str]]) -> float:
        scored.append(chosen)
        return sum(table.get(chosen[e], 0.0) for e in named)

    def one_stage(e: int, sts: frozenset[str]) -> bool:
        return len(sts) <= 1 if e == 0 else True

    sets = [frozenset({0}), frozenset({1})]
    for order in (["a", "b"], ["b", "a"]):
        chosen, start, total, complete = greedy_additions([0], order, sets[:1], score, allowed=one_stage)
        assert chosen == {0: frozenset({"b"})} and (start, total, complete) == (0.0, 2.0, True), order
    assert scored and all(len(ch[0]) <= 1 for ch in scored)  # {a, b} was never sampled
    veto = greedy_additions([0], ["a", "b"], sets[:1], score, allowed=one_stage,
                            confirm=[lambda named, ch: -1.0 if ch[0] == {"b"} else score(named, ch)])[0]
    assert veto == {0: frozenset({"a"})}
    steps = []
    chosen, _, total, _ = greedy_additions([0, 1], ["a", "b", "c"], sets, score, allowed=one_stage,
                                           progress=lambda i, n: steps.append((i, n)))
    assert chosen == {0: frozenset({"c"}), 1: frozenset({"a", "c"})} and total == 7.0
    assert steps == [(i, 6) for i in range(6)]


def _search_taking_every_change(toy, tmp_path, monkeypatch, **search) -> tuple:  # noqa: ANN001
    """One training step, then the block search with ``search`` options and a judge that takes every change (so
    every pass is hand-computable); the gate file goes to ``tmp_path/g.safetensors``. Returns the search record,
    the expert names, the gated UNet scopes per stage (``unet:`` dropped) and the progress records."""
    backend, experts, refs, prompts, guide = toy
    monkeypatch.setitem(GAINS, "mean", lambda trial, now: 1.0)
    cfg = TrainConfig(**RECIPE, steps=1, block_search=True, search_prompts=2, search_steps=2, **search)
    seen: list[dict] = []
    result = train(cfg, backend, experts, refs, compose_prompts=prompts, guide=guide, progress=seen.append,
                   out_path=str(tmp_path / "g.safetensors"))
    scopes: dict[str, list[str]] = {}
    for sc in result.gates.scopes:
        if stage_of(sc) is not None:
            scopes.setdefault(stage_of(sc).removeprefix("unet:"), []).append(sc)
    return result.gates.info["training"]["block_search_result"], [e.name for e in experts], scopes, seen


def _set_rows(loaded: mole.GateFile, scope: str) -> dict[tuple, list[float]]:
    """A scope's per-set scales in a loaded gate file: the set's on-pattern → its factors (none: empty)."""
    rows = loaded.tensors.get(f"gates.{scope}.sets")
    return {} if rows is None else dict(zip(map(tuple, rows.tolist()),
                                            loaded.tensors[f"gates.{scope}.set_scale"].tolist()))


def _assert_set_levels(loaded: mole.GateFile, scope: str, runs_all: bool, names: list[str], labels: list[str],
                       level: Callable[[str, str], float]) -> None:
    """A scope's per-set scales: none where every LoRA runs (``runs_all``), else one row per set label whose named
    LoRAs run at ``level(label, name)`` and the others at 1."""
    rows = _set_rows(loaded, scope)
    if runs_all:
        assert rows == {}, scope
        return
    for lb in labels:
        named = tuple(float(x in lb.split("+")) for x in names)
        assert rows[named] == pytest.approx([level(lb, x) if x in lb.split("+") else 1.0 for x in names],
                                            abs=1e-5), (scope, lb)


def test_greedy_shares_keeps_each_experts_best_feasible_share_and_the_mean_need():
    """Sets {0}, {1}, {0, 1}, floors 0.7. Expert 0: the pair needing 0.2 less (+1.0) and the single 0.2 more (−0.3)
    nets +0.7, the best of its six shares (0.1: +0.5, 0.3: +0.2, the single as donor: −0.5). Expert 1: 0.2 less in
    the pair would net +2.0, but the single cannot carry 0.9 (``feasible``) and is never scored so; 0.1 nets +0.2.
    Each expert's mean need over its sets stays 0.7; a held-back scorer on which expert 0's 0.2 share falls leaves
    the 0.1 one; progress steps once per candidate of :func:`share_moves`."""
    pair = frozenset({0, 1})
    table = {(pair, 0): {0.6: 0.6, 0.5: 1.0, 0.4: 1.2}, (frozenset({0}), 0): {0.8: -0.1, 0.9: -0.3, 1.0: -1.0,
                                                                             0.6: -0.5, 0.5: -0.5, 0.4: -0.5},
             (pair, 1): {0.6: 0.2, 0.5: 2.0}, (frozenset({1}), 1): {0.6: -1.0, 0.5: -1.0, 0.4: -1.0}}
    scored = []

    def score(named: frozenset[int], needs: dict[int, float]) -> float:
        scored.append((named, dict(needs)))
        return sum(table.get((named, e), {}).get(round(needs[e], 6), 0.0) for e in named)

    def feasible(named: frozenset[int], e: int, need: float) -> bool:
        return not (named == frozenset({1}) and need > 0.8 + 1e-9)

    sets = [frozenset({0}), frozenset({1}), pair]
    steps = []
    needs, start, total, complete = greedy_shares([0, 1], sets, 0.7, score, feasible,
                                                  progress=lambda i, n: steps.append((i, n)))
    assert needs == {frozenset({0}): {0: pytest.approx(0.9)}, frozenset({1}): {1: pytest.approx(0.8)},
                     pair: {0: pytest.approx(0.5), 1: pytest.approx(0.6)}}
    assert (start, complete) == (0.0, True) and total == pytest.approx(0.9)
    assert all(needs[frozenset({e})][e] + needs[pair][e] == pytest.approx(1.4) for e in (0, 1))
    assert not any(named == frozenset({1}) and n[1] > 0.8 + 1e-9 for named, n in scored)
    assert len(share_moves([0, 1], sets)) == 12 and steps == [(i, 12) for i in range(12)]
    veto = greedy_shares([0, 1], sets, 0.7, score, feasible, confirm=[
        lambda named, n: -5.0 if round(n.get(0, 0.7), 6) == 0.5 else score(named, n)])[0]
    assert veto[pair][0] == pytest.approx(0.6) and veto[frozenset({0})][0] == pytest.approx(0.8)
    assert share_moves([0, 1, 2], sets) == share_moves([0, 1], sets)  # an expert named by one set has no share


def test_larger_share_steps_let_one_composition_keep_less_of_a_floor():
    """Sets {0}, {0, 1} and {0, 2}, floors 0.7, expert 0 only scored. The pair {0, 1} scores best needing 0.1 (the
    0.6 step, +2.0), the others lose a little as they rise (0.7 + 0.6 / 2 = 1.0: −0.4 each) — net +1.2, above the
    0.3 step's +0.6 (0.4: +0.8, the others at 0.85: −0.1 each). With the default steps the 0.3 share is kept; with
    ``share_steps_up_to(0.6)`` the 0.6 one; the mean need over the three sets stays 0.7 either way. The candidates:
    3 donors × 3 or × 6 steps."""
    one, two, three = frozenset({0}), frozenset({0, 1}), frozenset({0, 2})
    gain = {(two, 0.1): 2.0, (two, 0.4): 0.8, (one, 1.0): -0.4, (three, 1.0): -0.4, (one, 0.85): -0.1,
            (three, 0.85): -0.1}

    def score(named: frozenset[int], needs: dict[int, float]) -> float:
        return gain.get((named, round(needs[0], 6)), 0.0)

    sets = [one, two, three]
    for steps, want in ((SHARE_STEPS, 0.4), (share_steps_up_to(0.6), 0.1)):
        needs, start, total, complete = greedy_shares([0], sets, 0.7, score, lambda *_: True, steps=steps)
        assert needs[two][0] == pytest.approx(want) and complete
        assert sum(needs[s][0] for s in sets) == pytest.approx(2.1)
        assert total == pytest.approx(1.2 if want == 0.1 else 0.6) and start == 0.0
        assert len(share_moves([0], sets, steps)) == 3 * len(steps)


def test_share_steps_are_tenths_up_to_the_largest_and_anything_else_is_one_line():
    assert share_steps_up_to(0.3) == SHARE_STEPS == (0.1, 0.2, 0.3)
    assert share_steps_up_to(0.6) == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6) and share_steps_up_to(1.0)[-1] == 1.0
    for bad in (0.25, 0.0, -0.1, 1.1):
        with pytest.raises(mole.MoleError, match=rf"^block search share_max_step must be a multiple of 0.1 in "
                                                 rf"\[0.1, 1\], got {bad}$"):
            share_steps_up_to(bad)


def test_a_search_asked_for_more_prompts_than_a_set_has_says_so(toy, tmp_path, caplog):
    """The toy world has 2 composition prompts per set: ``search_prompts`` 3 scores those 2 and says so in one
    warning naming the count asked for and each short set; 2 gives no warning."""
    backend, experts, refs, prompts, guide = toy
    for asked in (3, 2):
        caplog.clear()
        cfg = TrainConfig(**RECIPE, steps=1, block_search=True, search_prompts=asked, search_steps=1)
        with caplog.at_level("WARNING", logger="mole.train"):
            train(cfg, backend, experts, refs, compose_prompts=prompts, guide=guide,
                  out_path=str(tmp_path / f"g{asked}.safetensors"))
        warned = [r.getMessage() for r in caplog.records if "fewer composition prompts" in r.getMessage()]
        if asked == 2:
            assert warned == []
            continue
        assert len(warned) == 1 and warned[0].startswith("block search: fewer composition prompts than "
                                                         "search_prompts (3) for {")
        assert all(f"'{'+'.join(e.name for e in sub)}': 2" in warned[0]
                   for sub in ([experts[0]], [experts[0], experts[1]], [experts[1], experts[2]]))


def test_can_carry_matches_the_hand_computed_floor(toy):
    """:func:`can_carry`: an expert switched off in every stage but the first can reach a need g when its
    switched-off stages carry (g·n − n_on) / n_off ≤ 1 — hand-computed from the scope counts; with stages zeroed
    the rest carries it; nothing lacking (the kept stages give g) is always carried."""
    backend, experts, _, _, _ = toy
    with attached(backend, experts, TrainConfig(**RECIPE)) as (gated, _):
        stages, order, n, most, n_off = _all_but_the_first_stage(gated)
        zero = frozenset(order[1:3])
        n_zero = sum(len(stages[st]) for st in zero)
        seen = set()
        for need in (0.5, 0.7, 0.9, 1.0):
            lack = need * n - (n - n_off)
            assert can_carry(gated, stages, 0, most, frozenset(), need) == (lack / n_off <= 1), need
            ok = lack <= 0 or lack / (n_off - n_zero) <= 1
            assert can_carry(gated, stages, 0, most, zero, need) == ok, need
            seen.add(ok)
        assert seen == {True, False}  # both sides of the bound are exercised
        assert can_carry(gated, stages, 0, frozenset({"unet:mid_block"}), frozenset({"unet:mid_block"}), 0.5)
        assert not can_carry(gated, stages, 0, most, most, 0.5)


@pytest.mark.parametrize("max_step", [0.3, 0.5])
def test_floor_sharing_writes_each_compositions_own_needs(toy, tmp_path, monkeypatch, max_step):
    """``search_share_floors`` with ``own`` sets and floors 0.8, with a judge that takes every change: each set
    switches its LoRAs off in every stage but the last; every share ties, so each LoRA's first candidate is kept —
    the first pair naming it needs 0.1 less (0.7), its other pair 0.1 more (0.9); a set naming one LoRA keeps 0.8.
    The record's shares and floors (g·n − n_on) / n_off, the progress count (the stage passes, then 3 LoRAs × 2
    pairs × the steps up to ``search_share_max_step``) and the gate file's per-set scales equal those hand-computed
    ones; each LoRA's mean need over its pairs stays 0.8."""
    record, names, scopes, seen = _search_taking_every_change(toy, tmp_path, monkeypatch, search_by_set="own",
                                                              search_min_strength=0.8, search_share_floors=True,
                                                              search_share_max_step=max_step)
    order, n = list(scopes), sum(map(len, scopes.values()))
    n_on = len(scopes[order[-1]])
    labels = list(record["by_set"])
    assert sorted(map(len, (lb.split("+") for lb in labels))) == [1, 1, 1, 2, 2, 2]
    pairs = [lb for lb in labels if "+" in lb]
    first = {x: next(lb for lb in pairs if x in lb.split("+")) for x in names}
    want = {lb: {x: (0.7 if first[x] == lb else 0.9) if lb in pairs else 0.8 for x in lb.split("+")} for lb in labels}
    assert record["shares"] == {lb: {x: pytest.approx(v) for x, v in want[lb].items()} for lb in pairs}
    assert record["floors"] == {lb: {x: pytest.approx((v * n - n_on) / (n - n_on), abs=1e-5) for x, v in w.items()}
                                for lb, w in want.items()}
    assert all(sum(want[lb][x] for lb in pairs if x in lb.split("+")) == pytest.approx(1.6) for x in names)
    total = sum(len(lb.split("+")) for lb in labels) * len(order) + 3 * 2 * round(max_step * 10)
    assert record["candidates"] == total and \
        [r["candidate"] for r in seen if r.get("phase") == "block_search"] == list(range(1, total + 1))
    loaded = mole.read_gate_file(tmp_path / "g.safetensors")
    for st, sts in scopes.items():
        for sc in sts:
            assert torch.equal(2.0 * torch.sigmoid(loaded.tensors[f"gates.{sc}.magnitude_logit"]),
                               torch.ones(len(names)))
            _assert_set_levels(loaded, sc, st == order[-1], names, labels,
                               lambda lb, x: (want[lb][x] * n - n_on) / (n - n_on))


def test_floor_placement_after_sharing_keeps_each_sets_own_share(toy, tmp_path, monkeypatch):
    """Sharing, then placement (judge takes every change): the placement zeroes stages under each set's own need, so
    in the gate file every LoRA's mean UNet level in every set (1 where it runs, 0 where zeroed, its floor elsewhere,
    read from the per-set scales) equals its share — 0.7 / 0.9 in the pairs, 0.8 alone — and some stages are
    zeroed."""
    record, names, _, _ = _search_taking_every_change(toy, tmp_path, monkeypatch, search_by_set="own",
                                                      search_min_strength=0.8, search_share_floors=True,
                                                      search_place_floors=True)
    pairs = [lb for lb in record["by_set"] if "+" in lb]
    first = {x: next(lb for lb in pairs if x in lb.split("+")) for x in names}
    assert record["shares"] == {lb: {x: pytest.approx(0.7 if first[x] == lb else 0.9) for x in lb.split("+")}
                                for lb in pairs}
    assert record["zeroed"]  # the placement moved floors
    loaded = mole.read_gate_file(tmp_path / "g.safetensors")
    unet = [sc for sc in loaded.scopes if stage_of(sc) is not None]
    for lb in record["by_set"]:
        named = tuple(float(x in lb.split("+")) for x in names)
        for x in lb.split("+"):
            e, levels = names.index(x), []
            for sc in unet:
                levels.append(_set_rows(loaded, sc).get(named, [1.0] * len(names))[e])
            want = record["shares"].get(lb, {}).get(x, 0.8)
            assert sum(levels) / len(unet) == pytest.approx(want, abs=1e-5), (lb, x)


@pytest.mark.parametrize("by_set", ["off", "own"])
def test_floor_placement_zeroes_the_stages_it_reports_and_writes_the_carried_floors(toy, tmp_path, monkeypatch,
                                                                                 by_set):
    """``search_place_floors``: with a judge that takes every change, every pass's result is hand-computable — the
    stage pass switches each LoRA off in every stage but the last, the placement zeroes its switched-off stages in
    order while the rest can carry the 0.9 floor at ≤ 1 (every gain ties, so each round's best is its first
    allowed stage). The record's zeroed stages and floors, the progress count
    and the gate file (magnitudes, or per-set scales with ``own``) equal that."""
    record, names, scopes, seen = _search_taking_every_change(toy, tmp_path, monkeypatch, search_by_set=by_set,
                                                              search_min_strength=0.9, search_place_floors=True)
    order, n = list(scopes), sum(map(len, scopes.values()))
    n_off = n - len(scopes[order[-1]])
    need = 0.9 * n - len(scopes[order[-1]])
    zeroed, carry = [], n_off
    for st in order[:-1]:
        if carry - len(scopes[st]) > 0 and need / (carry - len(scopes[st])) <= 1:
            zeroed, carry = zeroed + [st], carry - len(scopes[st])
    assert zeroed and need / carry > 0.9  # the placement moves the floor (the test exercises it)
    labels = ["+".join(names[e] for e in sorted(named)) for named in
              [frozenset(names.index(x) for x in lb.split("+")) for lb in record["floors"]]]
    assert len(labels) >= 2
    assert record["zeroed"] == {lb: {x: sorted(zeroed) for x in lb.split("+")} for lb in labels}
    assert record["floors"] == {lb: {x: pytest.approx(need / carry, abs=1e-5) for x in lb.split("+")}
                                for lb in labels}
    per_pass = len(names) * len(order) if by_set == "off" else sum(len(lb.split("+")) for lb in labels) * len(order)
    assert record["candidates"] == 2 * per_pass and \
        [r["candidate"] for r in seen if r.get("phase") == "block_search"] == list(range(1, 2 * per_pass + 1))
    loaded = mole.read_gate_file(tmp_path / "g.safetensors")
    for st, sts in scopes.items():
        level = 0.0 if st in zeroed else 1.0 if st == order[-1] else need / carry
        for sc in sts:
            m = 2.0 * torch.sigmoid(loaded.tensors[f"gates.{sc}.magnitude_logit"])
            if by_set == "off":
                assert m.tolist() == pytest.approx([level] * len(names), abs=1e-5), sc
                continue
            assert torch.equal(m, torch.ones(len(names)))
            _assert_set_levels(loaded, sc, st == order[-1], names, labels, lambda lb, x, level=level: level)


@pytest.mark.parametrize("by_set", ["off", "refine"])
def test_block_search_with_min_strength_writes_the_floors_it_reports(toy, tmp_path, by_set):
    """``search_min_strength`` 0.9: the record's floors are the hand-computed ones for the switches it reports (none
    where the kept stages give 0.9 already), and the gate file runs each switched-off stage at that floor — as its
    magnitude (one shared choice) or as the set's per-set scale (``refine``; magnitudes stay 1)."""
    backend, experts, refs, prompts, guide = toy
    cfg = TrainConfig(**RECIPE, steps=1, block_search=True, search_by_set=by_set, search_prompts=2, search_steps=2,
                      search_min_strength=0.9)
    result = train(cfg, backend, experts, refs, compose_prompts=prompts, guide=guide,
                   out_path=str(tmp_path / "g.safetensors"))
    record = result.gates.info["training"]["block_search_result"]
    names = [e.name for e in experts]
    scopes = {}
    for s in result.gates.scopes:
        if stage_of(s) is not None:
            scopes.setdefault(stage_of(s).removeprefix("unet:"), []).append(s)
    n = sum(map(len, scopes.values()))
    choices = record["by_set"] if by_set == "refine" else {
        label: {x: record["off"][x] for x in label.split("+") if x in record["off"]} for label in record["floors"]}
    want = {}
    for label, off in choices.items():
        for name, sts in off.items():
            n_off = sum(len(scopes[st]) for st in sts)
            f = min(max((0.9 * n - (n - n_off)) / n_off, 0.0), 0.9) if n_off else 0.0
            if f > 0:
                want.setdefault(label, {})[name] = pytest.approx(f, abs=1e-5)
    assert want and record["floors"] == want  # the toy search switches stages off that need a floor
    loaded = mole.read_gate_file(tmp_path / "g.safetensors")
    for scope in loaded.scopes:
        st = stage_of(scope) and stage_of(scope).removeprefix("unet:")
        m = 2.0 * torch.sigmoid(loaded.tensors[f"gates.{scope}.magnitude_logit"])
        if by_set == "off":
            for e, name in enumerate(names):
                off = st in record["off"].get(name, [])
                f = next((v[name] for v in record["floors"].values() if name in v), 0.0)
                assert float(m[e]) == pytest.approx(f if off else 1.0, abs=1e-5), (scope, name)
            continue
        assert torch.equal(m, torch.ones(len(names)))
        rows = loaded.tensors.get(f"gates.{scope}.sets")
        got = {} if rows is None else dict(zip(map(tuple, rows.tolist()),
                                               loaded.tensors[f"gates.{scope}.set_scale"].tolist()))
        for label, off in record["by_set"].items():
            named = [name in label.split("+") for name in names]
            gone = [name for name in names if st in off.get(name, [])]
            if gone:
                assert got[tuple(map(float, named))] == pytest.approx(
                    [record["floors"].get(label, {}).get(name, 0.0) if name in gone else 1.0 for name in names],
                    abs=1e-5), (scope, label)


def test_set_text_strengths_sets_text_encoder_magnitudes_exactly_and_undoes(toy):
    backend, experts, _, _, _ = toy
    with attached(backend, experts, TrainConfig(**RECIPE, m_max=3.0)) as (gated, static):
        te = text_scopes(gated)
        assert te and all(not s.startswith("unet:") for s in te)
        before = {s: gated.scope_gate(s).magnitude.detach().clone() for s in gated.scopes}
        undo = set_text_strengths(gated, te, {0: 2.5, 2: 1.0})
        for s in gated.scopes:
            m = gated.scope_gate(s).magnitude.detach()
            if s in te:
                assert float(m[0]) == pytest.approx(2.5, abs=1e-6) and torch.equal(m[1:], before[s][1:]), s
            else:
                assert torch.equal(m, before[s]), s
        undo()
        assert all(torch.equal(gated.scope_gate(s).magnitude.detach(), before[s]) for s in gated.scopes)
        with pytest.raises(mole.MoleError, match=r"text strength 3.0 must be in \(0, m_max 3.0\)"):
            set_text_strengths(gated, te, {1: 3.0})


@pytest.mark.parametrize(("windows", "aggregate"), [(False, "mean"), (True, "mean"), (False, "wins")])
def test_training_with_block_search_writes_the_switches_it_reports(toy, tmp_path, monkeypatch, windows, aggregate):
    """The gate file carries exactly the switches the record reports; the progress counts every candidate
    (``search_windows``: 2 × stages per LoRA, and each LoRA then runs in one contiguous window of stages);
    ``search_aggregate wins`` judges every candidate by its paired samples' wins (the mean may then fall)."""
    backend, experts, refs, prompts, guide = toy
    cfg = TrainConfig(**RECIPE, steps=2, block_search=True, search_prompts=2, search_steps=2, search_windows=windows,
                      search_aggregate=aggregate)
    compared = []

    def spy(trial, now):  # noqa: ANN001, ANN202 — records the samples compared, then compares as the search would
        compared.append(len(trial))
        return win_gain(trial, now)

    monkeypatch.setitem(GAINS, "wins", spy)
    seen = []
    result = train(cfg, backend, experts, refs, compose_prompts=prompts, guide=guide, progress=seen.append,
                   out_path=str(tmp_path / "g.safetensors"))
    record = result.gates.info["training"]["block_search_result"]
    stages = list(dict.fromkeys(st for st in map(stage_of, result.gates.scopes) if st is not None))
    n = len(experts) * len(stages) * (2 if windows else 1)
    assert record["candidates"] == n
    assert [r["candidate"] for r in seen if r.get("phase") == "block_search"] == list(range(1, n + 1))
    assert record["score"] >= record["start_score"] or aggregate == "wins"
    assert (set(compared) == {2}) if aggregate == "wins" else not compared  # 2 prompts per set, paired
    if windows:
        for name, off in record["off"].items():
            on = [k for k, st in enumerate(stages) if st.removeprefix("unet:") not in off]
            assert on and on == list(range(on[0], on[-1] + 1)), (name, off)
    loaded = mole.read_gate_file(tmp_path / "g.safetensors")
    names = [e.name for e in experts]
    for scope in loaded.scopes:
        logit = loaded.tensors[f"gates.{scope}.magnitude_logit"]
        for e, name in enumerate(names):
            off = stage_of(scope) is not None and stage_of(scope).removeprefix("unet:") in record["off"].get(name, [])
            assert float(logit[e]) == (OFF_LOGIT if off else 0.0), (scope, name)  # 0: magnitude 1, never trained


@pytest.mark.parametrize("rounds", [1, 2])
def test_training_with_the_text_pass_writes_the_magnitudes_it_reports(toy, tmp_path, rounds):
    """``search_text_strengths``: after the stage pass each LoRA tries the levels; the gate file's text-encoder
    magnitudes equal what the record reports (the level, or 1 where none raised the score), the UNet's are the
    last stage pass's (1 or ~0), and the progress counts every pass (``search_rounds`` 2: a second stage pass)."""
    backend, experts, refs, prompts, guide = toy
    cfg = TrainConfig(**RECIPE, m_max=3.0, steps=1, block_search=True, search_prompts=2, search_steps=2,
                      search_text_strengths="0.5,2.5", search_rounds=rounds)
    seen = []
    result = train(cfg, backend, experts, refs, compose_prompts=prompts, guide=guide, progress=seen.append,
                   out_path=str(tmp_path / "g.safetensors"))
    record = result.gates.info["training"]["block_search_result"]
    stages = {stage_of(s) for s in result.gates.scopes} - {None}
    n = len(experts) * (len(stages) * rounds + 2)
    assert record["candidates"] == n and record["complete"]
    assert [r["candidate"] for r in seen if r.get("phase") == "block_search"] == list(range(1, n + 1))
    assert set(record["text"].values()) <= {0.5, 2.5}
    loaded = mole.read_gate_file(tmp_path / "g.safetensors")
    names = [e.name for e in experts]
    for scope in loaded.scopes:
        m = 3.0 * torch.sigmoid(loaded.tensors[f"gates.{scope}.magnitude_logit"])
        for e, name in enumerate(names):
            if stage_of(scope) is None:
                assert float(m[e]) == pytest.approx(record["text"].get(name, 1.0), abs=1e-6), (scope, name)
            else:
                off = stage_of(scope).removeprefix("unet:") in record["off"].get(name, [])
                assert float(m[e]) == pytest.approx(0.0 if off else 1.0, abs=1e-6), (scope, name)


@pytest.mark.parametrize("by_set", ["own", "refine"])
def test_block_search_by_set_writes_each_set_s_switches_as_per_set_scales(toy, tmp_path, by_set):
    """``search_by_set``: one greedy pass per set of named concepts over its own LoRAs (the progress counts
    Σ |set| · stages candidates, after the shared pass's LoRAs · stages with ``refine``); the gate file (version 6)
    carries, in every scope of a stage, one row per set that switched a LoRA off there, with factor 0 for exactly
    those LoRAs, and leaves the magnitudes untouched."""
    backend, experts, refs, prompts, guide = toy
    cfg = TrainConfig(**RECIPE, steps=1, block_search=True, search_by_set=by_set, search_prompts=2, search_steps=2)
    seen = []
    result = train(cfg, backend, experts, refs, compose_prompts=prompts, guide=guide, progress=seen.append,
                   out_path=str(tmp_path / "g.safetensors"))
    record = result.gates.info["training"]["block_search_result"]
    names = [e.name for e in experts]
    stages = {stage_of(s) for s in result.gates.scopes} - {None}
    sets = {label: frozenset(names.index(n) for n in label.split("+")) for label in record["by_set"]}
    assert len(sets) >= 2 and record["off"] == {}
    n = sum(len(named) for named in sets.values()) * len(stages) + (by_set == "refine") * len(names) * len(stages)
    assert record["candidates"] == n and [r["candidate"] for r in seen if r.get("phase") == "block_search"] == \
        list(range(1, n + 1))
    loaded = mole.read_gate_file(tmp_path / "g.safetensors")
    assert loaded.info["version"] == (6 if any(record["by_set"].values()) else 4)
    for scope in loaded.scopes:
        assert torch.equal(loaded.tensors[f"gates.{scope}.magnitude_logit"], torch.zeros(len(names)))
        st = stage_of(scope)
        want = {}
        for label, named in sets.items():
            gone = {e for e in named if st and st.removeprefix("unet:") in record["by_set"][label].get(names[e], [])}
            if gone:
                want[tuple(float(e in named) for e in range(len(names)))] = [float(e not in gone)
                                                                              for e in range(len(names))]
        rows = loaded.tensors.get(f"gates.{scope}.sets")
        got = {} if rows is None else {tuple(r): sc for r, sc in zip(rows.tolist(),
                                                                     loaded.tensors[f"gates.{scope}.set_scale"].tolist())}
        assert got == want, scope


def test_per_set_text_scales_run_the_set_s_prompts_as_its_levels_and_leave_other_prompts_alone(toy):
    """Oracle: the real text encoder with the expert's text-encoder magnitudes set to the level
    (:func:`set_text_strengths`, what the search scores). A prompt naming exactly the set encodes the same with the
    per-set scales; a prompt naming another set encodes as with no scales at all."""
    backend, experts, _, _, _ = toy
    with attached(backend, experts, TrainConfig(**RECIPE, m_max=3.0)) as (gated, static):
        te = text_scopes(gated)
        pair, other = ["a red striped star on grey"], ["a purple striped circle on grey"]
        mole.calibrate_triggers(gated, backend.encode_prompts, pair + other, CONCEPTS)
        with torch.no_grad():  # a router as crisp as a trained one: on above cosine 0.5, σ(±13) or sharper
            gated.gates["router"].scale.fill_(60.0)
            gated.gates["router"].bias.fill_(-30.0)
        set_text_strengths(gated, te, {1: 2.0, 2: 0.5})  # as if trained: the factor is the level over these

        def encoded(prompts: list[str]) -> torch.Tensor:
            gated.clear_live_gates()
            gated.routes.clear()
            with torch.no_grad():
                return backend.encode_prompts(prompts)["encoder_hidden_states"]

        plain = encoded(pair), encoded(other)
        undo = set_text_strengths(gated, te, {1: 2.5})
        at_level = encoded(pair)
        undo()
        assert not torch.allclose(at_level, plain[0], atol=1e-4)  # the level changes this prompt's encoding
        write_set_text_scales(gated, te, {frozenset({1, 2}): {1: 2.5}, frozenset({0, 1}): {}})
        rows = gated.scope_gate(te[0])
        assert rows.sets.tolist() == [[0.0, 1.0, 1.0]]
        assert rows.set_scale[0].tolist() == pytest.approx([1.0, 2.5 / 2.0, 1.0], abs=1e-6)
        torch.testing.assert_close(encoded(pair), at_level, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(encoded(other), plain[1], atol=1e-5, rtol=1e-5)


def test_block_search_text_by_set_writes_each_set_s_levels_as_per_set_text_scales(toy, tmp_path):
    """``search_text_by_set``: after the per-set stage passes each set tries the levels for its own LoRAs (the
    progress counts Σ |set| · (stages + levels)); the record has no shared levels, and the gate file's text-encoder
    scopes carry one row per set that chose a level, each chosen expert's factor its level over the untouched
    magnitude 1."""
    backend, experts, refs, prompts, guide = toy
    cfg = TrainConfig(**RECIPE, m_max=3.0, steps=1, block_search=True, search_by_set="own", search_prompts=2,
                      search_steps=2, search_text_strengths="0.5,2.5", search_text_by_set=True)
    seen = []
    result = train(cfg, backend, experts, refs, compose_prompts=prompts, guide=guide, progress=seen.append,
                   out_path=str(tmp_path / "g.safetensors"))
    record = result.gates.info["training"]["block_search_result"]
    names = [e.name for e in experts]
    sets = {label: frozenset(names.index(n) for n in label.split("+")) for label in record["by_set"]}
    stages = {stage_of(s) for s in result.gates.scopes} - {None}
    n = sum(len(named) for named in sets.values()) * (len(stages) + 2)
    assert record["candidates"] == n and record["complete"] and record["text"] == {}
    assert [r["candidate"] for r in seen if r.get("phase") == "block_search"] == list(range(1, n + 1))
    chosen = record.get("text_by_set", {})
    assert set(chosen) <= set(sets) and all(set(lv.values()) <= {0.5, 2.5} for lv in chosen.values())
    loaded = mole.read_gate_file(tmp_path / "g.safetensors")
    want = {tuple(float(e in sets[label]) for e in range(len(names))):
            [chosen[label].get(name, 1.0) for name in names] for label in chosen}
    for scope in loaded.scopes:
        if stage_of(scope) is not None:
            continue
        m = 3.0 * torch.sigmoid(loaded.tensors[f"gates.{scope}.magnitude_logit"])
        assert m.tolist() == pytest.approx([1.0] * len(names), abs=1e-6), scope
        rows = loaded.tensors.get(f"gates.{scope}.sets")
        got = {} if rows is None else {tuple(r): sc for r, sc in zip(rows.tolist(),
                                                                     loaded.tensors[f"gates.{scope}.set_scale"].tolist())}
        assert got.keys() == want.keys(), scope
        for row, scale in want.items():
            assert got[row] == pytest.approx(scale, abs=1e-6), scope


def test_held_back_draws_score_the_same_prompts_on_the_generators_next_noise(toy, tmp_path, monkeypatch):
    """``search_draws`` 2: the first draw's noise is the seeded generator's first (as with one draw), the held-back
    draw's its second, on the same prompts; the held-back draw is sampled for no more candidates than the first,
    and the gate file still carries exactly the switches the record reports."""
    backend, experts, refs, prompts, guide = toy
    calls = []
    real = ComposeObjective.guidance

    def spy(self, prompts, noise, steps, conditioning=None):  # noqa: ANN001, ANN202 — records, then runs the real one
        calls.append((tuple(prompts), noise.clone()))
        return real(self, prompts, noise, steps, conditioning)

    monkeypatch.setattr(ComposeObjective, "guidance", spy)
    cfg = TrainConfig(**RECIPE, steps=1, block_search=True, search_prompts=2, search_steps=2, search_batch=2,
                      search_draws=2)
    result = train(cfg, backend, experts, refs, compose_prompts=prompts, guide=guide,
                   out_path=str(tmp_path / "g.safetensors"))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    first = torch.randn(calls[0][1].shape, generator=gen)
    second = torch.randn(calls[0][1].shape, generator=gen)
    draw0 = [c for c in calls if torch.equal(c[1], first)]
    draw1 = [c for c in calls if torch.equal(c[1], second)]
    assert len(draw0) + len(draw1) == len(calls) and draw0 and draw1 and not torch.equal(first, second)
    assert len(draw1) <= len(draw0) and {p for p, _ in draw1} <= {p for p, _ in draw0}
    record = result.gates.info["training"]["block_search_result"]
    loaded = mole.read_gate_file(tmp_path / "g.safetensors")
    for scope in loaded.scopes:
        logit = loaded.tensors[f"gates.{scope}.magnitude_logit"]
        for e, e_name in enumerate(e.name for e in experts):
            off = stage_of(scope) is not None and stage_of(scope).removeprefix("unet:") in record["off"].get(e_name, [])
            assert float(logit[e]) == (OFF_LOGIT if off else 0.0), (scope, e_name)


def test_compositions_only_scores_and_writes_the_sets_of_two_or_more_loras_only(toy, tmp_path, monkeypatch):
    """``search_compositions_only`` (refine): of the toy world's sets (each LoRA alone, each pair) the guide samples
    only the pairs' prompts, the progress counts the shared pass over the pairs' LoRAs and each pair's refinement,
    the record has the pairs only, and no per-set row of the gate file has one LoRA on (a prompt naming one LoRA
    runs it in every stage)."""
    backend, experts, refs, prompts, guide = toy
    sampled: set[str] = set()
    real = ComposeObjective.guidance

    def spy(self, ps, noise, steps, conditioning=None):  # noqa: ANN001, ANN202 — records the prompts, then runs it
        sampled.update(ps)
        return real(self, ps, noise, steps, conditioning)

    monkeypatch.setattr(ComposeObjective, "guidance", spy)
    record, _, scopes, seen = _search_taking_every_change(toy, tmp_path, monkeypatch, search_by_set="refine",
                                                          search_compositions_only=True)
    named = [[c for c in CONCEPTS if c in p.split()] for p in prompts.compositions]
    pairs = {"+".join(f"{c}.safetensors" for c in n) for n in named if len(n) == 2}
    assert len(pairs) == 3 and any(len(n) == 1 for n in named) and set(record["by_set"]) == pairs
    assert sampled == {p for p, n in zip(prompts.compositions, named) if len(n) == 2}
    n = len(scopes) * (3 + 2 * len(pairs))  # the shared pass over the pairs' 3 LoRAs, then each pair's 2
    assert record["candidates"] == n and [r["candidate"] for r in seen if r.get("phase") == "block_search"] == \
        list(range(1, n + 1))
    assert any(record["by_set"][lb] for lb in pairs)  # the judge takes every change: something is switched off
    loaded = mole.read_gate_file(tmp_path / "g.safetensors")
    for scope in loaded.scopes:
        assert all(sum(on) == 2 for on in _set_rows(loaded, scope)), scope


def test_compositions_only_without_a_composition_is_a_one_line_error_before_training(toy, tmp_path):
    """Composition prompts that each name one LoRA leave ``search_compositions_only`` nothing to search: one line
    before the first training step (no progress, no file)."""
    backend, experts, refs, prompts, guide = toy
    singles = ComposePrompts([p for p in prompts.compositions if sum(c in p.split() for c in CONCEPTS) == 1],
                             prompts.base)
    assert singles.compositions
    cfg = TrainConfig(**RECIPE, steps=1, block_search=True, search_prompts=2, search_compositions_only=True)
    seen: list[dict] = []
    with pytest.raises(mole.MoleError, match=r"^block search compositions_only: no composition prompt names the "
                                             r"trigger words of two or more LoRAs \(write each LoRA's trigger word, "
                                             r"its file name, into the prompts\)$"):
        train(cfg, backend, experts, refs, compose_prompts=singles, guide=guide, progress=seen.append,
              out_path=str(tmp_path / "g.safetensors"))
    assert seen == [] and not (tmp_path / "g.safetensors").exists()


def test_block_search_needs_trigger_gates_and_the_compose_objective():
    with pytest.raises(mole.MoleError, match="`block_search` needs objective compose and gate_input trigger"):
        TrainConfig(**{**RECIPE, "gate_input": "prompt", "route_weight": 0.0}, block_search=True)
    with pytest.raises(mole.MoleError, match=r"`search_rounds` must be ≥ 1 \(above 1 needs `block_search`\), got 0"):
        TrainConfig(**RECIPE, block_search=True, search_rounds=0)
    with pytest.raises(mole.MoleError, match="`search_rounds` must be ≥ 1 .*got 2 with block_search False"):
        TrainConfig(**RECIPE, search_rounds=2)
    with pytest.raises(mole.MoleError, match=r"`search_draws` must be ≥ 1 \(above 1 needs `block_search`\), got 0"):
        TrainConfig(**RECIPE, block_search=True, search_draws=0)
    with pytest.raises(mole.MoleError, match="`search_draws` must be ≥ 1 .*got 2 with block_search False"):
        TrainConfig(**RECIPE, search_draws=2)
    with pytest.raises(mole.MoleError, match="`search_prompts`, `search_steps` and `search_batch` must be ≥ 1"):
        TrainConfig(**RECIPE, block_search=True, search_steps=0)
    with pytest.raises(mole.MoleError, match="`search_text_strengths` needs `block_search`"):
        TrainConfig(**RECIPE, search_text_strengths="2")
    with pytest.raises(mole.MoleError, match=r"values must be in \(0, m_max 2.0\), got 2.5"):
        TrainConfig(**RECIPE, block_search=True, search_text_strengths="1.5, 2.5")
    with pytest.raises(mole.MoleError, match="must be comma-separated numbers, e.g. 1.5,2,2.5, got '2;3'"):
        TrainConfig(**RECIPE, block_search=True, search_text_strengths="2;3")
    with pytest.raises(mole.MoleError, match=r"`search_dark_view` must be in \(0, 1\) and needs `block_search`, got "
                       "0.25 with block_search False"):
        TrainConfig(**RECIPE, search_dark_view=0.25)
    with pytest.raises(mole.MoleError, match=r"`search_dark_view` must be in \(0, 1\) and needs `block_search`, got "
                       "1.5 with block_search True"):
        TrainConfig(**RECIPE, block_search=True, search_dark_view=1.5)
    with pytest.raises(mole.MoleError, match="`search_windows` needs `block_search`"):
        TrainConfig(**RECIPE, search_windows=True)
    with pytest.raises(mole.MoleError, match="`search_aggregate` 'wins' needs `block_search`"):
        TrainConfig(**RECIPE, search_aggregate="wins")
    with pytest.raises(mole.MoleError, match=r"`search_aggregate` must be one of \('mean', 'wins'\), got 'median'"):
        TrainConfig(**RECIPE, block_search=True, search_aggregate="median")
    with pytest.raises(mole.MoleError, match="`search_text_by_set` needs `search_by_set` own or refine and "
                                             "`search_text_strengths`, got search_by_set 'off'"):
        TrainConfig(**RECIPE, m_max=3.0, block_search=True, search_text_strengths="2", search_text_by_set=True)
    with pytest.raises(mole.MoleError, match="`search_text_by_set` needs .*search_text_strengths ''"):
        TrainConfig(**RECIPE, block_search=True, search_by_set="own", search_text_by_set=True)
    with pytest.raises(mole.MoleError, match=r"`search_min_strength` must be in \[0, 1\] and below m_max 2.0, and "
                                             "above 0 needs `block_search`, got 0.5 with block_search False"):
        TrainConfig(**RECIPE, search_min_strength=0.5)
    with pytest.raises(mole.MoleError, match="`search_min_strength` must be in .*got 1.5 with block_search True"):
        TrainConfig(**RECIPE, block_search=True, search_min_strength=1.5)
    with pytest.raises(mole.MoleError, match="`search_min_strength` must be in .*got -0.1 with block_search True"):
        TrainConfig(**RECIPE, block_search=True, search_min_strength=-0.1)
    with pytest.raises(mole.MoleError, match=r"^`search_place_floors` needs `search_min_strength` above 0 \(it "
                                             r"moves the floors\)$"):
        TrainConfig(**RECIPE, block_search=True, search_place_floors=True)
    with pytest.raises(mole.MoleError, match=r"^`search_share_floors` needs `search_min_strength` above 0 and "
                                             r"`search_by_set` own or refine, got 0.7 and 'off'$"):
        TrainConfig(**RECIPE, block_search=True, search_min_strength=0.7, search_share_floors=True)
    with pytest.raises(mole.MoleError, match=r"^`search_share_max_step` needs `search_share_floors`, got 0.6$"):
        TrainConfig(**RECIPE, block_search=True, search_min_strength=0.7, search_by_set="own",
                    search_share_max_step=0.6)
    with pytest.raises(mole.MoleError, match=r"^`search_share_max_step` must be a multiple of 0.1 in \[0.1, 1\], "
                                             r"got 0.35$"):
        TrainConfig(**RECIPE, block_search=True, search_min_strength=0.7, search_by_set="own",
                    search_share_floors=True, search_share_max_step=0.35)
    with pytest.raises(mole.MoleError, match=r"^`search_compositions_only` needs `block_search`$"):
        TrainConfig(**RECIPE, search_compositions_only=True)
    with pytest.raises(mole.MoleError, match="`search_by_set` needs `block_search`"):
        TrainConfig(**RECIPE, search_by_set="own")
    with pytest.raises(mole.MoleError, match=r"`search_by_set` must be one of \('off', 'own', 'refine'\), got 'yes'"):
        TrainConfig(**RECIPE, block_search=True, search_by_set="yes")


def test_search_blocks_refuses_bad_floor_options_before_touching_anything():
    """Through the API too (no config in between): one line each, raised before the objective or the mixture is
    read (both ``None`` here)."""
    with pytest.raises(mole.MoleError, match=r"^block search place_floors needs min_strength above 0 \(it moves "
                                             r"the floors\)$"):
        search_blocks(None, None, per_set=1, steps=1, seed=0, batch=1, place_floors=True)
    for kwargs in ({}, {"min_strength": 0.7}, {"by_set": "own"}):
        with pytest.raises(mole.MoleError, match=r"^block search share_floors needs min_strength above 0 and by_set "
                                                 r"own or refine \(each set keeps its own share of a floor\)$"):
            search_blocks(None, None, per_set=1, steps=1, seed=0, batch=1, share_floors=True, **kwargs)
    with pytest.raises(mole.MoleError, match=r"^block search min_strength must be in \[0, 1\], got 1.5$"):
        search_blocks(None, None, per_set=1, steps=1, seed=0, batch=1, min_strength=1.5)
    with pytest.raises(mole.MoleError, match=r"^block search share_max_step 0.5 needs share_floors \(it bounds the "
                                             r"shares\)$"):
        search_blocks(None, None, per_set=1, steps=1, seed=0, batch=1, share_max_step=0.5)


def test_a_stop_during_the_block_search_keeps_the_gates_partial_and_the_checkpoint_before_it(toy, tmp_path):
    """Ctrl-C (``should_stop``) during the search: the run counts as cancelled, its gates go to the partial file
    (never over ``out_path``) with the switches made so far, and the checkpoint holds the trained gates of the last
    step (no switch in them), so ``--resume`` searches again."""
    from train.checkpoint import read_checkpoint
    from train.engine import partial_path

    backend, experts, refs, prompts, guide = toy
    cfg = TrainConfig(**RECIPE, steps=1, block_search=True, search_prompts=1, search_steps=1)
    seen = []
    out, ckpt = tmp_path / "g.safetensors", tmp_path / "g.state.safetensors"
    result = train(cfg, backend, experts, refs, compose_prompts=prompts, guide=guide, progress=seen.append,
                   should_stop=lambda: sum(r.get("phase") == "block_search" for r in seen) >= 3,
                   out_path=str(out), checkpoint_path=str(ckpt))
    assert result.cancelled and result.steps_done == 1 and not out.exists()
    assert result.path == partial_path(str(out))
    assert result.gates.info["training"]["block_search_result"]["complete"] is False
    state = read_checkpoint(str(ckpt))
    assert state.step == 1 and all(bool((p > OFF_LOGIT).all()) for p in state.params)


def _objective(toy, cfg: TrainConfig, gated: mole.Mixture, static: mole.Mixture | None  # noqa: ANN001
               ) -> tuple[ComposeObjective, tuple[int, ...]]:
    """The compose objective of the toy world's references and prompts on ``gated``, and the latent shape."""
    from train.compose import latent_shape, reference_embeddings
    from train.data import load_image, to_tensor

    backend, _, refs, prompts, guide = toy
    emb = reference_embeddings(guide, [to_tensor(load_image(r), 32) for r in refs], [r.concept for r in refs])
    shape = latent_shape(backend, 32)
    return ComposeObjective(cfg, backend, [gated, static], guide, prompts, emb, shape), shape


def test_guidance_scores_the_same_images_in_any_batch_split(toy):
    """``search_batch`` only bounds memory: scoring two prompts together or one at a time from the same noise gives
    the same guidance; other noise gives another."""
    backend, experts, _, prompts, _ = toy
    cfg = TrainConfig(**RECIPE)
    with attached(backend, experts, cfg) as (gated, static):
        objective, shape = _objective(toy, cfg, gated, static)
        pair = prompts.compositions[:2]
        noise = torch.randn((2, *shape), generator=torch.Generator().manual_seed(3))
        whole = objective.guidance(pair, noise, 3)
        split = torch.cat([objective.guidance(pair[i:i + 1], noise[i:i + 1], 3) for i in range(2)])
        torch.testing.assert_close(split, whole, atol=1e-5, rtol=0)
        assert (objective.guidance(pair, torch.randn_like(noise), 3) - whole).abs().max() > 1e-3


def test_guidance_with_the_dark_view_keeps_each_image_s_worse_score(toy):
    """``search_dark_view``: per image, the guidance is the lower of the rollout image's score and its dark view's
    (:func:`train.dark_view.dark_to_background`), so never above the plain guidance from the same noise."""
    from train.compose import ComposeObjective, latent_shape, reference_embeddings
    from train.dark_view import dark_to_background
    from train.data import load_image, to_tensor

    backend, experts, refs, prompts, guide = toy
    plain_cfg, dark_cfg = TrainConfig(**RECIPE), TrainConfig(**RECIPE, block_search=True, search_dark_view=0.5)
    with attached(backend, experts, plain_cfg) as (gated, static):
        emb = reference_embeddings(guide, [to_tensor(load_image(r), 32) for r in refs], [r.concept for r in refs])
        shape = latent_shape(backend, 32)
        plain, dark = (ComposeObjective(cfg, backend, [gated, static], guide, prompts, emb, shape)
                       for cfg in (plain_cfg, dark_cfg))
        four = prompts.compositions[:4]
        noise = torch.randn((4, *shape), generator=torch.Generator().manual_seed(5))
        images = plain.rollout_images(four, noise, 3)
        own, view = plain.score_images(images, four), plain.score_images(dark_to_background(images, 0.5), four)
        torch.testing.assert_close(plain.guidance(four, noise, 3), own, atol=1e-5, rtol=0)
        torch.testing.assert_close(dark.guidance(four, noise, 3), torch.minimum(own, view), atol=1e-5, rtol=0)
        assert (own - view).abs().max() > 1e-4  # the view changed what the guide sees


def test_guidance_with_the_texture_weight_adds_the_weighted_texture_term_of_the_image(toy):
    """``search_texture_weight``: per image, the guidance (here with the dark view too) plus the weight × the
    texture term of the rollout image (:func:`train.texture.texture_scores` against the named concepts'
    references), from the same noise; the term moves the score."""
    from train.compose import ComposeObjective, latent_shape, reference_embeddings
    from train.data import load_image, to_tensor
    from train.texture import reference_grams, texture_scores

    backend, experts, refs, prompts, guide = toy
    dark = dict(RECIPE, block_search=True, search_dark_view=0.25)
    plain_cfg, texture_cfg = TrainConfig(**dark), TrainConfig(**dark, search_texture_weight=0.5)
    with attached(backend, experts, plain_cfg) as (gated, static):
        images = [to_tensor(load_image(r), 32) for r in refs]
        emb = reference_embeddings(guide, images, [r.concept for r in refs])
        grams = reference_grams(guide, images, [r.concept for r in refs])
        shape = latent_shape(backend, 32)
        plain = ComposeObjective(plain_cfg, backend, [gated, static], guide, prompts, emb, shape)
        textured = ComposeObjective(texture_cfg, backend, [gated, static], guide, prompts, emb, shape, ref_grams=grams)
        four = prompts.compositions[:4]
        noise = torch.randn((4, *shape), generator=torch.Generator().manual_seed(5))
        term = texture_scores(guide, plain.rollout_images(four, noise, 3), [plain.named[p] for p in four], grams)
        torch.testing.assert_close(textured.guidance(four, noise, 3), plain.guidance(four, noise, 3) + 0.5 * term,
                                   atol=1e-5, rtol=0)
        assert term.abs().min() > 1e-3
        with pytest.raises(mole.MoleError, match="`search_texture_weight` needs the references' Gram matrices"):
            ComposeObjective(texture_cfg, backend, [gated, static], guide, prompts, emb, shape)


def test_training_with_the_texture_weight_scores_the_search_with_the_references_textures(toy, monkeypatch):
    """``train`` with ``search_texture_weight``: the block search's every scoring adds the texture term, against
    Gram matrices of exactly the references' images (one per concept the references name); a guide without texture
    features is refused before any training step."""
    import train.compose as compose
    from train.data import load_image, to_tensor
    from train.texture import reference_grams

    backend, experts, refs, prompts, guide = toy
    calls: list[dict] = []

    def spy(guide_, images, named, ref_grams):  # noqa: ANN001, ANN202
        calls.append(ref_grams)
        return real(guide_, images, named, ref_grams)

    real = compose.texture_scores
    monkeypatch.setattr(compose, "texture_scores", spy)
    cfg = TrainConfig(**RECIPE, steps=1, block_search=True, search_prompts=1, search_steps=1, search_texture_weight=0.1)
    result = train(cfg, backend, experts, refs, compose_prompts=prompts, guide=guide)
    assert result.gates.info["training"]["block_search_result"]["complete"] and calls
    want = reference_grams(guide, [to_tensor(load_image(r), 32) for r in refs], [r.concept for r in refs])
    assert set(calls[0]) == set(CONCEPTS)
    for c in CONCEPTS:
        torch.testing.assert_close(calls[0][c], want[c])
    steps = []
    with pytest.raises(mole.MoleError, match="`search_texture_weight` needs a guide with texture features"):
        train(cfg, backend, experts, refs, compose_prompts=prompts, guide=object(),
              progress=steps.append)
    assert steps == []


def test_batched_rollouts_score_each_candidate_as_scoring_it_alone_would(toy, monkeypatch):
    """:class:`train.search_rollouts.Rollouts` samples many candidates in one batch (per-sample UNet factors, each
    candidate's conditioning encoded under its text-encoder magnitudes, batches that cut across candidates): every
    candidate's scores equal scoring it alone with its change written into the gates; the gates are left as they
    were; a state already scored is not sampled again."""
    from train.block_search import prompt_sets
    from train.search_rollouts import Rollouts

    backend, experts, _, _, _ = toy
    cfg = TrainConfig(**RECIPE)
    with attached(backend, experts, cfg) as (gated, static):
        objective, shape = _objective(toy, cfg, gated, static)
        by_named = prompt_sets(objective, gated.experts, 2, compositions_only=True)
        pair, other = list(by_named)[:2]
        stages, te = unet_stages(gated), text_scopes(gated)
        first, *_, last = sorted(stages)
        e, f = sorted(pair)

        def noise(n: int) -> torch.Tensor:
            return torch.randn((n, *shape), generator=torch.Generator().manual_seed(5))

        def change(off: dict, levels: dict | None = None) -> Callable[[], Callable[[], None]]:
            def apply() -> Callable[[], None]:
                undo_text, undo = set_text_strengths(gated, te, levels or {}), switch_off(gated, stages, off)
                return lambda: (undo(), undo_text())[0]
            return apply

        requests = [(pair, change({e: frozenset({first})})), (pair, change({f: frozenset({first, last})})),
                    (pair, change({e: frozenset({last})}, {f: 1.5})), (other, change({})),
                    (pair, change({e: frozenset({first})}))]
        before = {k: v.clone() for k, v in gated.gates.state_dict().items()}
        judge = Rollouts(objective, gated, by_named, noise, 2, batch=5)  # a batch spans two text states
        got = judge.run(requests)
        assert all(torch.equal(v, before[k]) for k, v in gated.gates.state_dict().items())
        for (named, apply), scores in zip(requests, got):
            undo = apply()
            gated.routes.clear()
            want = objective.guidance(by_named[named], noise(len(by_named[named])), 2)
            undo()
            torch.testing.assert_close(scores, want, atol=1e-5, rtol=0)
        assert (got[0] - got[1]).abs().max() > 1e-4 and (got[0] - got[2]).abs().max() > 1e-4
        monkeypatch.setattr(ComposeObjective, "guidance", lambda *a, **k: pytest.fail("sampled a scored state"))
        assert all(torch.equal(a, b) for a, b in zip(judge.run(requests[::-1]), got[::-1]))
