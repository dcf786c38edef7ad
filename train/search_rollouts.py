"""The block search's judge, batched: many candidates' rollouts in one batch (:mod:`train.block_search`).

A candidate is a set of named LoRAs and the gate magnitudes its state sets (a :data:`Change`: applied to the
mixture, read, undone). The candidates of one greedy phase are independent, so their prompts are sampled
together: each sample's UNet gates are the mixture's times factors of its own (:meth:`Mixture.sample_scales`,
its candidate's magnitudes over the mixture's), its conditioning encoded beforehand under its candidate's
text-encoder magnitudes (set on the gates: a host may encode prompt by prompt). On the toy world one rollout of
48 prompts costs what 4.5 rollouts of 4 prompts do (the search had sampled one set of 4 prompts at a time). Every
state is scored once per judge: a later pass that returns to it reads the score.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mole_core import Mixture

from .compose import ComposeObjective

Change = Callable[[], Callable[[], None]]
"""Sets a candidate's gate magnitudes on the mixture; returns the undo (bit for bit)."""


def magnitudes(mix: Mixture) -> torch.Tensor:
    """Every scope's per-expert magnitude ``(S, N)`` (trigger gates), in :attr:`Mixture.scope_names` order."""
    return torch.stack([mix.scope_gate(s).magnitude.detach().float() for s in mix.scope_names]).cpu()


class Rollouts:
    """The guide's per-sample scores (:meth:`ComposeObjective.guidance`) of sets of named LoRAs under candidate
    gate states: set ``named``'s prompts ``prompts[named]``, sampled from ``noise(len(prompts))`` with a
    ``steps``-step rollout, ``batch`` images at a time. ``should_stop`` may end a :meth:`run` between batches."""

    def __init__(self, compose: ComposeObjective, mix: Mixture, prompts: Mapping[frozenset[int], list[str]],
                 noise: Callable[[int], torch.Tensor], steps: int, batch: int,
                 should_stop: Callable[[], bool] | None = None):
        self.compose, self.mix, self.prompts, self.noise = compose, mix, prompts, noise
        self.steps, self.batch, self.should_stop = steps, batch, should_stop
        self.text_rows = [i for i, s in enumerate(mix.scope_names) if not s.startswith("unet:")]
        self.cache: dict[tuple, torch.Tensor] = {}

    def run(self, requests: Sequence[tuple[frozenset[int], Change]], stoppable: bool = False
            ) -> list[torch.Tensor | None]:
        """Each request's per-sample scores, in order; ``stoppable``: None for those ``should_stop`` left unscored."""
        out: list[torch.Tensor | None] = [None] * len(requests)
        waiting: dict[tuple, list[int]] = {}
        groups: dict[bytes, list[_Candidate]] = {}  # by text-encoder magnitudes: encoded together
        for i, (named, change) in enumerate(requests):
            undo = change()
            try:
                mags = magnitudes(self.mix)
            finally:
                undo()
            key = (named, mags.numpy().tobytes())
            if key in self.cache:
                out[i] = self.cache[key]
            elif key in waiting:
                waiting[key].append(i)
            else:
                waiting[key] = [i]
                groups.setdefault(mags[self.text_rows].numpy().tobytes(), []).append(_Candidate(key, named, change,
                                                                                                mags))
        todo = [c for group in groups.values() for c in group]
        for c, scores in zip(todo, self._sample(list(groups.values()), stoppable) if todo else []):
            if scores is not None:
                self.cache[c.key] = scores
                for i in waiting[c.key]:
                    out[i] = scores
        return out

    def _sample(self, groups: list[list[_Candidate]], stoppable: bool) -> list[torch.Tensor | None]:
        """Score every candidate of ``groups`` (each group: the same text-encoder magnitudes), in group order, in
        batches of ``batch`` images: each group's prompts encoded under its text-encoder state, each sample's UNet
        gates scaled to its candidate's magnitudes."""
        todo = [c for group in groups for c in group]
        factors = torch.stack([c.mags for c in todo]) / magnitudes(self.mix)
        factors[:, self.text_rows] = 1.0  # the text encoders' state is in the conditioning
        sizes = [len(self.prompts[c.named]) for c in todo]
        prompts = [p for c in todo for p in self.prompts[c.named]]
        noise = torch.cat([self.noise(n) for n in sizes])
        variant = torch.repeat_interleave(torch.arange(len(todo)), torch.tensor(sizes))
        group_of = torch.tensor([g for g, group in enumerate(groups) for _ in group])[variant]  # per image
        scores: list[torch.Tensor] = []
        for lo in range(0, len(prompts), self.batch):
            if stoppable and lo and self.should_stop is not None and self.should_stop():
                break
            hi = min(lo + self.batch, len(prompts))
            self.mix.routes.clear()  # a batch's prompts only: the route table holds a bounded number
            conds = []
            for g in group_of[lo:hi].unique_consecutive().tolist():  # each group's rows under its text state
                undo = groups[g][0].change()
                try:
                    conds.append(self.compose.conditioning([prompts[r] for r in range(lo, hi) if group_of[r] == g]))
                finally:
                    undo()
            rows = tuple({k: torch.cat([c[i][k] for c in conds]) for k in conds[0][i]} for i in (0, 1))
            with self.mix.sample_scales(factors, variant[lo:hi]):
                self.mix.clear_live_gates()
                scores.append(self.compose.guidance(prompts[lo:hi], noise[lo:hi], self.steps, rows).cpu())
        done = torch.cat(scores)
        ends = torch.tensor(sizes).cumsum(0).tolist()
        return [done[end - n:end] if end <= len(done) else None for n, end in zip(sizes, ends)]


@dataclass(frozen=True)
class _Candidate:
    key: tuple  # (set, every scope's magnitudes as bytes): one score per state
    named: frozenset[int]
    change: Change
    mags: torch.Tensor  # (S, N) under the change


class StateScore:
    """A greedy pass's score (:class:`train.greedy.BatchScore`): ``change(named, state)`` is what set ``named``'s
    state sets on the mixture; :meth:`many` scores a phase's candidates in one batched :meth:`Rollouts.run`."""

    def __init__(self, rollouts: Rollouts, change: Callable[[frozenset[int], Any], Change]):
        self.rollouts, self.change = rollouts, change

    def __call__(self, named: frozenset[int], state: Any) -> torch.Tensor:
        return self.rollouts.run([(named, self.change(named, state))])[0]  # not stoppable: always scored

    def many(self, requests: list[tuple[frozenset[int], Any]]) -> list[torch.Tensor | None]:
        return self.rollouts.run([(named, self.change(named, state)) for named, state in requests], stoppable=True)

