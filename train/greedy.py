"""The greedy passes of the block search (:mod:`train.block_search`): pure functions over score callbacks.

Each pass tries candidates (a LoRA switched off in a stage, a window of stages, a text level, a share of a floor)
for one expert at a time, scores the sets of named LoRAs a candidate touches through the caller's ``score``
(cached per set and state: a state is scored once), and keeps what raises the summed score — optionally only when
held-back scorers (``confirm``) rise too. Nothing here touches a model: :mod:`train.block_search` turns the
choices into gate magnitudes and per-set scales.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from mole_core import MoleError

log = logging.getLogger("mole.train")


Samples = float | torch.Tensor
"""A set's score under one candidate: the guide's mean, or its per-sample scores (every candidate sees the same
prompts and noise, so the samples are paired across candidates)."""
Score = Callable[[frozenset[int], dict[int, frozenset[str]]], Samples]
Compare = Callable[[Samples, Samples], float]


def _mean(score: Samples) -> float:
    return float(score.mean()) if isinstance(score, torch.Tensor) else score


def mean_gain(trial: Samples, now: Samples) -> float:
    """How much the mean score rises from ``now`` to ``trial``."""
    return _mean(trial) - _mean(now)


def win_gain(trial: Samples, now: Samples) -> float:
    """The share of paired samples that score higher under ``trial`` than ``now`` less the share that score
    lower (in [−1, 1])."""
    diff = torch.as_tensor(trial, dtype=torch.float64) - torch.as_tensor(now, dtype=torch.float64)
    return float((diff > 0).double().mean() - (diff < 0).double().mean())


GAINS: dict[str, Compare] = {"mean": mean_gain, "wins": win_gain}


Switches = dict[int, frozenset[str]]


class _Cached:
    """``score`` called once per set and state of the set's own experts (the others' state does not matter);
    :meth:`prefetch` scores many at once when ``score`` has a ``many`` method (:class:`BatchScore`)."""

    def __init__(self, score: Score):
        self.score = score
        self.cache: dict[tuple, Samples] = {}

    @staticmethod
    def _key(named: frozenset[int], state: dict) -> tuple:
        return named, tuple((e, state[e]) for e in sorted(named))

    def __call__(self, named: frozenset[int], state: dict) -> Samples:
        key = self._key(named, state)
        if key not in self.cache:
            self.cache[key] = self.score(named, {e: state[e] for e in named})
        return self.cache[key]

    def prefetch(self, requests: Sequence[tuple[frozenset[int], dict]]) -> None:
        """Score every ``(set, state)`` of ``requests`` not scored yet, in one :meth:`BatchScore.many` call when the
        score has one (the candidates of one phase are independent: one batched rollout serves them all)."""
        many = getattr(self.score, "many", None)
        todo: dict[tuple, tuple[frozenset[int], dict]] = {}
        for named, state in requests:
            key = self._key(named, state)
            if key not in self.cache:
                todo[key] = (named, {e: state[e] for e in named})
        if many is not None and len(todo) > 1:  # a stop may leave some unscored (None): scored when asked for
            self.cache.update((key, r) for key, r in zip(todo, many(list(todo.values()))) if r is not None)


class BatchScore(Protocol):
    """A score that can also score many ``(set, state)`` requests at once (one batched rollout)."""

    def __call__(self, named: frozenset[int], state: dict) -> Samples: ...

    def many(self, requests: list[tuple[frozenset[int], dict]]) -> list[Samples | None]:
        """Each request's score, in order (None: left unscored by a stop)."""


def _prefetch(one: _Cached, sets: Sequence[frozenset[int]], e: int | None, states: Sequence[dict]) -> None:
    """Score at once each set naming ``e`` (every set: None) under each of ``states``."""
    one.prefetch([(s, st) for st in states for s in sets if e is None or e in s])


def _gain(one: Callable[[frozenset[int], dict], Samples], sets: Sequence[frozenset[int]], e: int, trial: dict,
          now: dict, compare: Compare = mean_gain) -> float:
    """How much the change of expert ``e`` from ``now`` to ``trial`` raises the score of the sets naming it, summed
    over those sets (``compare``: the mean's rise, or the paired samples' win share)."""
    return sum(compare(one(s, trial), one(s, now)) for s in sets if e in s)


def _holds(confirm: Sequence[Callable[[frozenset[int], dict], Samples]], sets: Sequence[frozenset[int]], e: int,
           trial: dict, now: dict, compare: Compare = mean_gain) -> bool:
    """Whether the change from ``now`` to ``trial`` of expert ``e`` also raises the summed score of the sets naming
    ``e`` under every held-back scorer of ``confirm``."""
    if all(_gain(one, sets, e, trial, now, compare) > 0 for one in confirm):
        return True
    log.info("block search: a change of LoRA %d raised the score but not on every held-back draw; not kept", e)
    return False


def greedy_search(experts: Sequence[int], stages: Sequence[str], sets: Sequence[frozenset[int]], score: Score,
                  progress: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  start_off: Switches | None = None,
                  confirm: Sequence[Score] = (), compare: Compare = mean_gain) -> tuple[Switches, float, float, bool]:
    """One greedy pass: for each expert and stage, flip it (on → off, or off → on when ``start_off`` has it off)
    when the summed score of the expert sets that contain the expert rises (``compare``: by the mean, or by the
    paired samples' win share, :func:`win_gain`). ``score(named, off)`` scores one set
    given each of its experts' switched-off stages; each scorer of ``confirm`` (e.g. another noise draw) is asked
    only about flips that raise ``score``, and the flip is kept only when it raises theirs too. Returns the
    switched-off stages per expert, the start and the final total mean score (of ``score``), and whether every
    candidate was tried (``should_stop`` ends the pass early, keeping the switches made so far)."""
    off: Switches = {e: frozenset((start_off or {}).get(e, ())) for e in experts}
    one = _Cached(score)
    held = [_Cached(c) for c in confirm]
    _prefetch(one, sets, None, [off])
    total = start = sum(_mean(one(s, off)) for s in sets)
    todo = [(e, st) for e in experts for st in stages]
    for i, (e, st) in enumerate(todo):
        if should_stop is not None and should_stop():
            return off, start, total, False
        if progress is not None:
            progress(i, len(todo))
        if st not in off[e] and len(off[e]) + 1 == len(stages):  # never switch a LoRA off everywhere in the UNet
            continue
        trial = {**off, e: off[e] ^ {st}}
        if _gain(one, sets, e, trial, off, compare) > 0 and _holds(held, sets, e, trial, off, compare):
            off, total = trial, total + _gain(one, sets, e, trial, off)
    return off, start, total, True


def greedy_additions(experts: Sequence[int], stages: Sequence[str], sets: Sequence[frozenset[int]], score: Score,
                     progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None,
                     confirm: Sequence[Score] = (), compare: Compare = mean_gain,
                     allowed: Callable[[int, frozenset[str]], bool] | None = None
                     ) -> tuple[Switches, float, float, bool]:
    """Best improvement from no stage chosen: for each expert, each round scores adding every stage ``allowed``
    permits (default: any) and keeps the one that raises the summed score of the sets naming the expert most (and,
    with ``confirm``, each held-back scorer's); the expert's rounds end when none raises it. Unlike
    :func:`greedy_search`'s first improvement, the result does not depend on the order of ``stages``. ``progress``
    counts one step per possible round (``stages`` per expert). Returns as :func:`greedy_search`."""
    chosen: Switches = {e: frozenset() for e in experts}
    one, held = _Cached(score), [_Cached(c) for c in confirm]
    _prefetch(one, sets, None, [chosen])
    total = start = sum(_mean(one(s, chosen)) for s in sets)
    n = len(stages)
    for k, e in enumerate(experts):
        for r in range(n):
            if progress is not None:
                progress(k * n + r, n * len(experts))
            best: tuple[float, Switches] | None = None
            _prefetch(one, sets, e, [chosen] + [{**chosen, e: chosen[e] | {st}} for st in stages if st not in chosen[e]
                                                and (allowed is None or allowed(e, chosen[e] | {st}))])
            for st in stages:
                if should_stop is not None and should_stop():
                    return chosen, start, total, False
                trial = {**chosen, e: chosen[e] | {st}}
                if st in chosen[e] or (allowed is not None and not allowed(e, trial[e])):
                    continue
                gain = _gain(one, sets, e, trial, chosen, compare)
                if gain > 0 and (best is None or gain > best[0]) and _holds(held, sets, e, trial, chosen, compare):
                    best = (gain, trial)
            if best is None:
                for rest in range(r + 1, n):  # the rounds it did not need
                    if progress is not None:
                        progress(k * n + rest, n * len(experts))
                break
            chosen, total = best[1], total + _gain(one, sets, e, best[1], chosen)
    return chosen, start, total, True


def _window(stages: Sequence[str], first: int, last: int) -> frozenset[str]:
    """The switched-off stages of an expert that runs only in ``stages[first:last + 1]``."""
    return frozenset(stages[:first]) | frozenset(stages[last + 1:])


def greedy_windows(experts: Sequence[int], stages: Sequence[str], sets: Sequence[frozenset[int]], score: Score,
                   progress: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None,
                   start_off: Switches | None = None,
                   confirm: Sequence[Score] = (), compare: Compare = mean_gain) -> tuple[Switches, float, float, bool]:
    """One pass over contiguous windows of ``stages`` (in execution order): for each expert, first the window's
    start (the expert runs from ``stages[i]`` to its last running stage), then its end (from its first running
    stage to ``stages[j]``); each phase keeps the window that raises the summed score of the sets naming the
    expert most (and, with ``confirm``, raises each held-back scorer's too), or the expert's switches as they were.
    Reaches in two moves what single flips reach only through a path of rising steps (e.g. star only in ``mid``,
    ``up0``, ``up1``). Candidates: 2 × stages per expert (an end before the start is skipped). Returns as
    :func:`greedy_search`."""
    off: Switches = {e: frozenset((start_off or {}).get(e, ())) for e in experts}
    one, held = _Cached(score), [_Cached(c) for c in confirm]
    _prefetch(one, sets, None, [off])
    total = start = sum(_mean(one(s, off)) for s in sets)
    n, i = len(stages), 0
    for e in experts:
        for phase in ("start", "end"):
            on = [k for k, st in enumerate(stages) if st not in off[e]] or list(range(n))
            best: tuple[float, Switches] | None = None
            spans = [(k, on[-1]) if phase == "start" else (on[0], k) for k in range(n)]
            _prefetch(one, sets, e, [off] + [{**off, e: _window(stages, a, b)} for a, b in spans if a <= b])
            for k in range(n):
                if should_stop is not None and should_stop():
                    return off, start, total, False
                if progress is not None:
                    progress(i, 2 * n * len(experts))
                i += 1
                first, last = (k, on[-1]) if phase == "start" else (on[0], k)
                if first > last:
                    continue
                trial = {**off, e: _window(stages, first, last)}
                gain = _gain(one, sets, e, trial, off, compare)
                if gain > 0 and (best is None or gain > best[0]) and _holds(held, sets, e, trial, off, compare):
                    best = (gain, trial)
            if best is not None:
                off, total = best[1], total + _gain(one, sets, e, best[1], off)
    return off, start, total, True


Strengths = dict[int, float]


def greedy_strengths(experts: Sequence[int], levels: Sequence[float], sets: Sequence[frozenset[int]],
                     score: Callable[[frozenset[int], Strengths], Samples],
                     progress: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None,
                     confirm: Sequence[Callable[[frozenset[int], Strengths], Samples]] = (),
                     compare: Compare = mean_gain) -> tuple[Strengths, float, float, bool]:
    """One greedy pass over the experts: each takes the level of ``levels`` that raises the summed score of the
    sets containing it most, or keeps 1 (as trained) when none raises it. ``score(named, strengths)`` scores one
    set given its experts' levels; with ``confirm`` (held-back scorers, e.g. other noise draws) a level counts
    only when it raises each of theirs too; ``compare`` as in :func:`greedy_search`. Returns the levels (1.0:
    unchanged), the start and final total mean score (of ``score``), and whether every candidate was tried
    (``should_stop`` ends the pass early, keeping the levels chosen so far)."""
    chosen: Strengths = {e: 1.0 for e in experts}
    one = _Cached(score)
    held = [_Cached(c) for c in confirm]
    _prefetch(one, sets, None, [chosen])
    total = start = sum(_mean(one(s, chosen)) for s in sets)
    todo = [(e, lv) for e in experts for lv in levels]
    best: tuple[float, float] | None = None  # (gain, level) of the current expert
    for i, (e, lv) in enumerate(todo):
        if should_stop is not None and should_stop():
            return chosen, start, total, False
        if progress is not None:
            progress(i, len(todo))
        if i == 0 or todo[i - 1][0] != e:  # the expert's first level: every level at once
            _prefetch(one, sets, e, [chosen] + [{**chosen, e: level} for level in levels])
        trial = {**chosen, e: lv}
        gain = _gain(one, sets, e, trial, chosen, compare)
        if gain > 0 and (best is None or gain > best[0]) and _holds(held, sets, e, trial, chosen, compare):
            best = (gain, lv)
        if i + 1 == len(todo) or todo[i + 1][0] != e:  # the expert's last level: keep its best
            if best is not None:
                trial = {**chosen, e: best[1]}
                chosen, total = trial, total + _gain(one, sets, e, trial, chosen)
            best = None
    return chosen, start, total, True


SHARE_STEPS = (0.1, 0.2, 0.3)  # how far :func:`greedy_shares` may lower one set's floor need


def share_steps_up_to(largest: float, name: str = "block search share_max_step") -> tuple[float, ...]:
    """The steps of :func:`greedy_shares` up to ``largest``: 0.1, 0.2, … (``largest`` a multiple of 0.1 in
    [0.1, 1], else a one-line error naming it ``name``; 0.3 gives :data:`SHARE_STEPS`)."""
    n = round(largest * 10)
    if not (1 <= n <= 10 and abs(largest * 10 - n) < 1e-6):
        raise MoleError(f"{name} must be a multiple of 0.1 in [0.1, 1], got {largest}")
    return tuple(k / 10 for k in range(1, n + 1))


def share_moves(experts: Sequence[int], sets: Sequence[frozenset[int]], steps: Sequence[float] = SHARE_STEPS
                ) -> list[tuple[int, frozenset[int], float]]:
    """The candidates of :func:`greedy_shares`: (expert, the set whose need falls, by how much), for each expert
    named by two or more of ``sets``."""
    return [(e, donor, step) for e in experts if sum(e in s for s in sets) > 1
            for donor in sets if e in donor for step in steps]


def greedy_shares(experts: Sequence[int], sets: Sequence[frozenset[int]], base: float,
                  score: Callable[[frozenset[int], dict[int, float]], Samples],
                  feasible: Callable[[frozenset[int], int, float], bool],
                  progress: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  confirm: Sequence[Callable[[frozenset[int], dict[int, float]], Samples]] = (),
                  compare: Compare = mean_gain, steps: Sequence[float] = SHARE_STEPS
                  ) -> tuple[dict[frozenset[int], dict[int, float]], float, float, bool]:
    """Share each expert's floor among the sets naming it: every set starts needing ``base`` of it (the mean UNet
    magnitude it keeps there); a candidate (:func:`share_moves`) lowers one set's need by a step and raises the
    others' equally, so the mean over the sets stays ``base`` — the mean the routing target measures — and each
    raised need must be ≤ 1 and ``feasible(set, expert, need)``. ``score(named, needs)`` scores one set given its
    experts' needs; per expert the candidate that raises the summed score of its sets most is kept (with
    ``confirm``, only when it raises each held-back scorer's too; ``compare`` as in :func:`greedy_search`), or
    none. Returns each set's needs, the start and final total mean score, and whether every candidate was tried."""
    needs = {s: {e: base for e in s} for s in sets}
    one, held = _Cached(score), [_Cached(c) for c in confirm]
    one.prefetch([(s, needs[s]) for s in sets])
    total = start = sum(_mean(one(s, needs[s])) for s in sets)
    todo = share_moves(experts, sets, steps)

    def gain(scorer: Callable[[frozenset[int], dict], Samples], trial: dict, how: Compare = compare) -> float:
        return sum(how(scorer(s, trial[s]), scorer(s, needs[s])) for s in trial)

    def move(e: int, donor: frozenset[int], step: float) -> dict | None:
        """The needs of the sets naming ``e`` after the move, or None when a raised need is not feasible."""
        others = [s for s in sets if e in s and s != donor]
        low, high = base - step, base + step / len(others)
        if low >= 0 and high <= 1 and all(feasible(s, e, high) for s in others):
            return {s: {**needs[s], e: low if s == donor else high} for s in [donor, *others]}
        return None

    best: tuple[float, dict] | None = None  # (gain, trial) of the current expert
    for i, (e, donor, step) in enumerate(todo):
        if should_stop is not None and should_stop():
            return needs, start, total, False
        if progress is not None:
            progress(i, len(todo))
        if i == 0 or todo[i - 1][0] != e:  # the expert's first move: every move's sets at once
            trials = [t for m in todo if m[0] == e for t in (move(*m),) if t is not None]
            one.prefetch([(s, needs[s]) for s in sets if e in s] + [(s, t[s]) for t in trials for s in t])
        trial = move(e, donor, step)
        if trial is not None:
            g = gain(one, trial)
            if g > 0 and (best is None or g > best[0]):
                if all(gain(h, trial) > 0 for h in held):
                    best = (g, trial)
                else:
                    log.info("block search: a floor share of LoRA %d raised the score but not on every held-back "
                             "draw; not kept", e)
        if i + 1 == len(todo) or todo[i + 1][0] != e:  # the expert's last candidate: keep its best
            if best is not None:
                total += gain(one, best[1], mean_gain)
                needs.update(best[1])
            best = None
    return needs, start, total, True
