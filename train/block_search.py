"""Block search (issue #12): after the router has learned which LoRAs a prompt names, choose per LoRA the UNet
stages it runs in, by what the image-text guide sees.

Two LoRAs that each draw their concept well at full strength can spoil each other when both run everywhere (on
the toy world, with the star LoRA in every block, most striped stars come out as dotted stars or crosses). The
gradient of the guidance terms does not find the cure: trained per-block magnitudes lower composition. A discrete
search does better:

- the UNet's scopes are grouped into stages (``down_blocks.i``, ``mid_block``, ``up_blocks.i``);
- for each LoRA and stage in turn (one pass, greedy, first improvement), the LoRA is switched off in that stage
  (its magnitude set to ~0 in the stage's scopes) and kept off when the guide's score of the compositions that
  name it rises;
- the score is the compose objective's own guidance (``global_weight`` · image–prompt similarity +
  ``local_weight`` · similarity to the named concepts' references) of images sampled with the full rollout
  from fixed noise: every candidate sees the same prompts and noise, so differences are the switch's alone.

Only compositions that name a LoRA are resampled when that LoRA is switched; scores are cached per composition
and per switch state of the LoRAs it names. The result is an ordinary gate file: those magnitudes are ~0.

With ``text_strengths`` (e.g. 1.5, 2, 2.5) a second pass follows: for each LoRA in turn, its magnitude in every
text-encoder scope is set to each of those values, and the one that raises the summed score of the compositions
naming it most is kept (none: it stays as trained). On the toy world, an oracle router with the striped LoRA's
text part at 2–2.5 composes the pairs at 0.85–0.88 where every on/off choice of UNet stages stays at ≤ 0.85.

With ``by_set`` (``own``: from every stage on; ``refine``: from the shared choice, after the shared passes) each
set of named concepts gets its own stage pass over its own LoRAs, and the choices are stored as per-set scales
of the trigger gates (:func:`mole_core.gates.set_factors`): a pair's stages no longer have to serve the triple.

With ``text_by_set`` (and ``by_set``) the text pass runs per set over its own LoRAs instead, and each set's levels
are stored as per-set scales of the text-encoder scopes: on the toy world striped + star asks for the striped LoRA's
text part at 2.5 where the triple pulls the shared choice down to 1.5–2.

With ``rounds`` > 1 more stage passes follow, with those text magnitudes, each flipping a stage either way (on the
toy world a second pass did not raise composition: bench/results/composition_history.md).

With ``windows`` the stage passes choose, per LoRA, the contiguous window of stages it runs in (its start, then
its end) instead of flipping one stage at a time: on the toy world the best assignment (star only in ``mid``,
``up0``, ``up1``) is one window, which single flips from every stage on did not reach.

With ``aggregate`` ``wins`` a change is judged by its paired samples (the same prompt and noise under both
switch states) instead of the mean: its gain is the share of samples the guide scores higher less the share it
scores lower, so a few samples whose score falls a lot cannot outvote most that rise a little. On seed 0's
striped + star (nine hand-set assignments scored offline on the training templates) the mean separated the best
known one (probes 0.64) from two worse ones (0.48, 0.39) by 0.001 and put a third (0.45) 0.025 above it; head to
head the best known one scores higher on 58–88 % of the samples than four of the five other plausible ones (47 %
against that third). Measured in the bench: with per-set refinement (``by_set refine``, windows, per-set text)
pairs 0.87 instead of 0.84, triple 0.77 instead of 0.86; with one shared choice worse (pairs 0.75 instead of 0.79,
triple 0.85 instead of 0.97), so ``mean`` stays the default.

With ``draws`` > 1 every pass also scores each change that raises the score on held-back noise draws (the same
prompts, the seeded generator's next noise) and keeps it only when it raises those too: the first draw's 16
samples per set are few, and a search free to fit them raises the guide's score while the probes fall.

With ``min_strength`` > 0 a named LoRA is never switched fully off: its switched-off stages run it at the lowest
strength that keeps its mean UNet magnitude at ``min_strength`` (:func:`floors`), and every candidate is scored
so. Whole-stage switches left purple at 0.17–0.36 of its strength on average on the prompts naming it; with 0.7
the benchmark's refine recipe keeps every named LoRA ≥ 0.73 there, pairs 0.86, triple 0.68 (0.86 without floors).
With ``place_floors`` a last pass chooses where each floor goes: switched-off stages may run the LoRA at 0, the
LoRA's other switched-off stages carrying its share (up to full strength, :func:`can_zero`), one stage at a time —
each round the one whose zeroing raises the score most — so the strength the mean needs goes where the guide sees
it hurt least. (A first version zeroed them in stage order, first improvement: on the toy world it zeroed star's
down stages first, moving its floor into ``up2``–``up3``, where it hurts most offline.) With ``share_floors`` (per
set of named LoRAs) a pass before the placement lets the sets that compose a LoRA with others share its floor
(:func:`greedy_shares`): the routing target is a mean over every composition prompt naming the LoRA, and the floors
cost the triple much more than the pairs.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mole_core import Expert, Mixture, MoleError
from mole_core.triggers import trigger_words

from .compose import ComposeObjective
from .greedy import (
    GAINS,
    SHARE_STEPS,
    Strengths,
    Switches,
    greedy_additions,
    greedy_search,
    greedy_shares,
    greedy_strengths,
    greedy_windows,
    share_moves,
    share_steps_up_to,
)
from .search_rollouts import Change, Rollouts, StateScore

log = logging.getLogger("mole.train")
OFF_LOGIT = -40.0  # magnitude m_max · σ(−40) ≈ 1e-17: the LoRA does nothing in that scope


def stage_of(scope: str) -> str | None:
    """The UNet stage of a gate scope (``unet:down_blocks.1.attentions.0`` → ``unet:down_blocks.1``,
    ``unet:mid_block.resnets.0`` → ``unet:mid_block``); None for text-encoder scopes."""
    comp, _, path = scope.partition(":")
    if comp != "unet" or not path:
        return None
    parts = path.split(".")
    return f"unet:{'.'.join(parts[:2]) if parts[0] in ('down_blocks', 'up_blocks') else parts[0]}"


@dataclass
class SearchResult:
    """Which stages each LoRA was switched off in, and the guide's score before and after."""

    off: dict[str, list[str]] = field(default_factory=dict)  # expert name → stages
    start_score: float = 0.0
    score: float = 0.0
    candidates: int = 0
    complete: bool = True  # False: stopped before every candidate was tried
    text: dict[str, float] = field(default_factory=dict)  # expert name → its text-encoder magnitude, when changed
    by_set: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # "a+b" → expert name → stages (by set)
    text_by_set: dict[str, dict[str, float]] = field(default_factory=dict)  # "a+b" → expert name → level (by set)
    floors: dict[str, dict[str, float]] = field(default_factory=dict)  # "a+b" → expert name → its switched-off
    # stages' strength, when ``min_strength`` gives it one (a shared choice: every set's entry)
    zeroed: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # "a+b" → expert name → the switched-off
    # stages the floor placement runs it at 0 in (its floor goes to its other switched-off stages)
    shares: dict[str, dict[str, float]] = field(default_factory=dict)  # "a+b" → expert name → the mean UNet
    # magnitude the set keeps of it, where the floor sharing moved it from ``min_strength``

    def to_dict(self) -> dict:
        out = {"off": self.off, "text": self.text, "start_score": round(self.start_score, 5),
               "score": round(self.score, 5), "candidates": self.candidates, "complete": self.complete}
        out = {**out, "by_set": self.by_set} if self.by_set else out
        out = {**out, "text_by_set": self.text_by_set} if self.text_by_set else out
        out = {**out, "floors": self.floors} if self.floors else out
        out = {**out, "zeroed": self.zeroed} if self.zeroed else out
        return {**out, "shares": self.shares} if self.shares else out


def unet_stages(mix: Mixture) -> dict[str, list[str]]:
    """The gated UNet scopes of ``mix`` grouped by stage, in execution order."""
    out: dict[str, list[str]] = {}
    for scope in mix.scopes:
        stage = stage_of(scope)
        if stage is not None:
            out.setdefault(stage, []).append(scope)
    return out


def _set_logits(changes: list[tuple[torch.Tensor, int, float]]) -> Callable[[], None]:
    """Write ``value`` into ``logit[e]`` for each ``(logit, e, value)``; returns the undo (bit for bit)."""
    saved = []
    with torch.no_grad():
        for logit, e, value in changes:
            saved.append((logit, e, float(logit[e])))
            logit[e] = value

    def undo() -> None:
        with torch.no_grad():
            for logit, e, value in reversed(saved):
                logit[e] = value
    return undo


def _shortfall(mix: Mixture, stages: dict[str, list[str]], e: int, off: frozenset[str], min_strength: float) -> float:
    """How much magnitude, summed over the UNet's gated scopes, expert ``e``'s switched-off stages ``off`` must
    carry for its mean to reach ``min_strength`` (the stages it keeps give the rest)."""
    on = sum(float(mix.scope_gate(scope).magnitude[e]) for st, scopes in stages.items() if st not in off
             for scope in scopes)
    return min_strength * sum(map(len, stages.values())) - on


def _scopes_in(stages: dict[str, list[str]], sts: frozenset[str]) -> int:
    """The number of gated scopes in the stages ``sts``."""
    return sum(len(stages[st]) for st in sts)


Needs = float | Mapping[int, float]
"""The mean UNet magnitude each expert must keep (``min_strength``): one value for every expert, or one per expert
(a set's own, after :func:`greedy_shares`)."""


def _need(min_strength: Needs, e: int) -> float:
    return float(min_strength) if isinstance(min_strength, (int, float)) else min_strength[e]


def floors(mix: Mixture, stages: dict[str, list[str]], off: dict[int, frozenset[str]],
           min_strength: Needs, zero: Switches | None = None) -> dict[int, float]:
    """Each expert's strength in its switched-off stages: the lowest at which its mean magnitude over the UNet's
    gated scopes (``stages``) stays ≥ its ``min_strength``, and never above it (0: switched off; always 0 when it
    is 0). With ``zero`` (per expert, switched-off stages run at 0 instead) that strength is carried by its other
    switched-off stages alone, up to full strength (1). The magnitudes are read from ``mix`` as they are."""
    out = {e: 0.0 for e in off}
    for e, sts in off.items():
        zeroed, need = (zero or {}).get(e, frozenset()), _need(min_strength, e)
        if need > 0 and sts - zeroed:
            needed = _shortfall(mix, stages, e, sts, need) / _scopes_in(stages, sts - zeroed)
            out[e] = min(max(needed, 0.0), 1.0 if zeroed else need)
    return out


def can_zero(mix: Mixture, stages: dict[str, list[str]], e: int, off: frozenset[str], zeroed: frozenset[str],
             min_strength: float) -> bool:
    """Whether expert ``e`` can run at 0 in its switched-off stages ``zeroed`` (⊆ ``off``) and still reach its mean
    UNet magnitude ``min_strength``: it has a floor above 0, and its other switched-off stages carry the floor at
    full strength (1) or less, and below the gates' ``m_max``."""
    if not (zeroed <= off and off - zeroed and min_strength > 0):
        return False
    shortfall = _shortfall(mix, stages, e, off, min_strength)
    return shortfall > 0 and _carries(mix, stages, off - zeroed, shortfall)


def can_carry(mix: Mixture, stages: dict[str, list[str]], e: int, off: frozenset[str], zeroed: frozenset[str],
              need: float) -> bool:
    """Whether expert ``e``'s switched-off stages ``off`` other than ``zeroed`` can carry what its mean UNet
    magnitude lacks of ``need``, at full strength (1) or less and below the gates' ``m_max`` (nothing lacking:
    yes)."""
    return _carries(mix, stages, off - zeroed, _shortfall(mix, stages, e, off, need))


def _carries(mix: Mixture, stages: dict[str, list[str]], carriers: frozenset[str], shortfall: float) -> bool:
    """Whether the stages ``carriers`` can carry ``shortfall`` (summed magnitude) at ≤ 1 and below ``m_max``."""
    if shortfall <= 0:
        return True
    if not carriers:
        return False
    carried = shortfall / _scopes_in(stages, carriers)
    return carried <= 1.0 and carried < mix.config.m_max


def _magnitude_logit(m_max: float, strength: float) -> float:
    """The magnitude logit giving ``strength`` (m_max·σ(ρ) = strength; ``OFF_LOGIT`` for 0)."""
    if strength >= m_max:
        raise MoleError(f"block search floor {strength} must be below the gates' m_max {m_max}")
    return OFF_LOGIT if strength <= 0 else math.log(strength / (m_max - strength))


def switch_off(mix: Mixture, stages: dict[str, list[str]], off: dict[int, frozenset[str]],
               min_strength: Needs = 0.0, zero: Switches | None = None) -> Callable[[], None]:
    """Set each expert's magnitude to ~0 in the scopes of its switched-off stages (or to its floor, :func:`floors`,
    with ``min_strength``; still ~0 in its ``zero`` stages); returns the undo."""
    floor, zero = floors(mix, stages, off, min_strength, zero), zero or {}
    return _set_logits([(gate.magnitude_logit, e,
                         _magnitude_logit(gate.m_max, 0.0 if st in zero.get(e, ()) else floor[e]))
                        for e, sts in off.items() for st in sts for scope in stages[st]
                        for gate in (mix.scope_gate(scope),)])


def write_set_scales(mix: Mixture, stages: dict[str, list[str]], offs: dict[frozenset[int], Switches],
                     min_strength: float = 0.0, zeros: dict[frozenset[int], Switches] | None = None,
                     needs: dict[frozenset[int], dict[int, float]] | None = None) -> None:
    """Store each named set's switched-off stages as per-set scales (:meth:`ScopeGate.set_set_scales`): in every
    scope of a stage, one row per set that switches a LoRA off there (its on-pattern; factor 0 for those LoRAs —
    or its floor over the scope's magnitude with ``min_strength``, or the set's own ``needs``, :func:`floors`,
    unless the set's ``zeros`` run it at 0 there — and 1 for the others). Scopes no set switches anything in keep
    none."""
    zeros, needs = zeros or {}, needs or {}
    floor = {named: floors(mix, stages, off, needs.get(named, min_strength), zeros.get(named))
             for named, off in offs.items()}
    for st, scopes in stages.items():
        rows = [(named, frozenset(e for e, sts in off.items() if st in sts)) for named, off in offs.items()]
        rows = [(named, gone) for named, gone in rows if gone]
        sets = torch.tensor([[float(e in named) for e in range(mix.n)] for named, _ in rows]).reshape(-1, mix.n)
        level = {named: {e: 0.0 if st in zeros.get(named, {}).get(e, ()) else floor[named][e] for e in gone}
                 for named, gone in rows}
        for scope in scopes:
            magnitude = mix.scope_gate(scope).magnitude.detach().float().tolist()
            scale = torch.tensor([[level[named][e] / magnitude[e] if e in gone else 1.0 for e in range(mix.n)]
                                  for named, gone in rows]).reshape(-1, mix.n)
            mix.scope_gate(scope).set_set_scales(sets, scale)


def write_set_text_scales(mix: Mixture, scopes: list[str], levels: dict[frozenset[int], Strengths]) -> None:
    """Store each named set's text-encoder levels as per-set scales of ``scopes``: one row per set with a level
    other than 1, each such expert's factor its level over its magnitude in the scope (so a prompt naming exactly
    that set runs the expert at that level there), 1 for the others."""
    rows = [(named, lv) for named, lv in levels.items() if any(v != 1.0 for v in lv.values())]
    if not rows:
        return
    sets = torch.tensor([[float(e in named) for e in range(mix.n)] for named, _ in rows])
    for scope in scopes:
        gate = mix.scope_gate(scope)
        magnitude = gate.magnitude.detach().float().tolist()
        scale = torch.tensor([[lv[e] / magnitude[e] if e in lv else 1.0 for e in range(mix.n)] for _, lv in rows])
        gate.set_set_scales(sets, scale)


def text_scopes(mix: Mixture) -> list[str]:
    """The gated text-encoder scopes of ``mix`` (every scope outside the UNet)."""
    return [scope for scope in mix.scopes if not scope.startswith("unet:")]


def set_text_strengths(mix: Mixture, scopes: list[str], strengths: Strengths) -> Callable[[], None]:
    """Set each expert's magnitude to its level in every scope of ``scopes`` (levels of 1.0 leave it as it is);
    returns the undo."""
    changes = []
    for e, level in strengths.items():
        if level == 1.0:
            continue
        for scope in scopes:
            gate = mix.scope_gate(scope)
            if not 0 < level < gate.m_max:
                raise MoleError(f"text strength {level} must be in (0, m_max {gate.m_max})")
            changes.append((gate.magnitude_logit, e, _magnitude_logit(gate.m_max, level)))
    return _set_logits(changes)


def prompt_sets(compose: ComposeObjective, experts: Sequence[Expert], per_set: int, compositions_only: bool = False
                ) -> dict[frozenset[int], list[str]]:
    """The search's sets: the LoRAs (indices into ``experts``) whose trigger words a composition prompt names →
    the first ``per_set`` such prompts, in prompt order; with ``compositions_only`` the sets of two or more. A
    one-line error when ``compositions_only`` leaves none (checked before training)."""
    words = trigger_words(experts, list(compose.ref_emb))
    by_named: dict[frozenset[int], list[str]] = {}
    for p in compose.prompts.compositions:
        named = frozenset(i for i, c in enumerate(words) if c and c in compose.named[p])
        if named and len(by_named.setdefault(named, [])) < per_set:
            by_named[named].append(p)
    if compositions_only:
        by_named = {named: ps for named, ps in by_named.items() if len(named) > 1}
        if not by_named:
            raise MoleError("block search compositions_only: no composition prompt names the trigger words of two or "
                            "more LoRAs (write each LoRA's trigger word, its file name, into the prompts)")
    return by_named


def search_blocks(compose: ComposeObjective, mix: Mixture, *, per_set: int, steps: int, seed: int, batch: int,
                  text_strengths: Sequence[float] = (), rounds: int = 1, by_set: str = "off", draws: int = 1,
                  windows: bool = False, text_by_set: bool = False, aggregate: str = "mean",
                  min_strength: float = 0.0, place_floors: bool = False, share_floors: bool = False,
                  compositions_only: bool = False, share_max_step: float = 0.3,
                  progress: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> SearchResult:
    """Greedy block search on ``mix`` (trigger gates) scored by ``compose``'s guide; the switched-off stages stay
    switched off in ``mix``. ``per_set``: composition prompts scored per set of named concepts, each sampled
    with a ``steps``-step rollout from the same ``seed``-ed noise for every candidate, ``batch`` prompts at a time.
    ``text_strengths``: then the text-encoder magnitude pass (module docstring) over these levels. ``rounds`` > 1:
    that many stage passes, each after the first run with the chosen text magnitudes and free to switch a stage
    back on. ``by_set``: ``own`` — each set of named concepts gets its own stage passes from every stage on;
    ``refine`` — after the shared passes, each set refines the shared choice with one pass of its own (flips
    either way); both stored as per-set scales (the stages a LoRA runs in then depend on which other LoRAs the
    prompt names); ``off`` — one choice serves every set. ``draws`` > 1: every pass keeps a change only when it
    also raises the score on each of ``draws`` − 1 held-back noise draws (the next noise of the same generator;
    scored only for changes that raise the first draw's), so a change that fits one draw's samples is not kept.
    ``windows``: the stage passes choose each LoRA's contiguous window of stages (:func:`greedy_windows`) instead
    of flipping one stage at a time. ``text_by_set`` (with ``by_set`` and ``text_strengths``): each set chooses its
    own text-encoder levels, stored as per-set scales of the text-encoder scopes. ``aggregate``: how a change's
    samples are weighed (:data:`GAINS`: ``mean`` — the mean score's rise; ``wins`` — the share of paired samples
    scored higher less the share scored lower). ``min_strength`` > 0: a LoRA is never switched fully off — its
    switched-off stages run it at the lowest strength (:func:`floors`) that keeps its mean magnitude over the
    UNet's gated scopes at ``min_strength``, and every candidate is scored so. ``place_floors`` (with
    ``min_strength``): a last pass (per set with ``by_set``) where the switched-off stages of a LoRA with a floor
    may run it at 0 instead, their share going to the LoRA's other switched-off stages (up to full strength; the
    mean stays at ``min_strength``, :func:`can_zero`): one stage at a time, the one that raises the score most
    (:func:`greedy_additions`), until none does. ``share_floors`` (with ``min_strength`` and ``by_set``): then a
    pass (before the placement) where the sets naming a LoRA among others share its floor — one set keeps less of it
    and the others more, their mean staying ``min_strength`` (:func:`greedy_shares`, one set's share lowered by 0.1 …
    ``share_max_step``; a set naming one LoRA keeps its floor). ``compositions_only``: only the sets naming two or
    more LoRAs are scored and chosen for (with ``by_set``, a prompt naming one LoRA then runs it in every stage, as
    loaded)."""
    if not 0.0 <= min_strength <= 1.0:
        raise MoleError(f"block search min_strength must be in [0, 1], got {min_strength}")
    if place_floors and not min_strength > 0:
        raise MoleError("block search place_floors needs min_strength above 0 (it moves the floors)")
    if share_floors and not (min_strength > 0 and by_set != "off"):
        raise MoleError("block search share_floors needs min_strength above 0 and by_set own or refine (each set "
                        "keeps its own share of a floor)")
    share_steps = share_steps_up_to(share_max_step)
    if share_steps != SHARE_STEPS and not share_floors:
        raise MoleError(f"block search share_max_step {share_max_step} needs share_floors (it bounds the shares)")
    if aggregate not in GAINS:
        raise MoleError(f"block search aggregate must be one of {sorted(GAINS)}, got {aggregate!r}")
    compare = GAINS[aggregate]
    if draws < 1:
        raise MoleError(f"block search draws must be ≥ 1, got {draws}")
    if mix.config.gate_input != "trigger":
        raise MoleError("block search needs gate_input trigger (one magnitude per LoRA and scope)")
    stages = unet_stages(mix)
    if len(stages) < 2:
        raise MoleError(f"block search needs a UNet with at least 2 gated stages, got {sorted(stages)}")
    if text_by_set and (by_set == "off" or not text_strengths):
        raise MoleError("block search text_by_set needs by_set own or refine and text strengths")
    by_named = prompt_sets(compose, mix.experts, per_set, compositions_only)
    short = {"+".join(mix.experts[e].name for e in sorted(named)): len(ps) for named, ps in by_named.items()
             if len(ps) < per_set}
    if short:
        log.warning("block search: fewer composition prompts than search_prompts (%d) for %s; those sets are "
                    "scored on the prompts they have", per_set, short)
    experts = sorted({e for s in by_named for e in s})
    sets = list(by_named)
    shared = [(experts, sets)]  # one search over every set
    own = [(sorted(s), [s]) for s in sets]  # one search per set over its own experts
    groups = own if by_set == "own" else shared

    te = text_scopes(mix)
    set_levels: dict[frozenset[int], Strengths] = {}  # text_by_set: each set's chosen text levels (scored with it)

    @functools.cache
    def noise_of(n: int) -> list[torch.Tensor]:
        """The ``draws`` noises for ``n`` prompts: the seeded generator's first, second, … ``(n, *latent)`` draw."""
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn((n, *compose.latent_shape), generator=gen) for _ in range(draws)]

    def state(named: frozenset[int], off: Switches, zero: Switches | None = None, need: Needs | None = None,
              levels: Strengths | None = None) -> Change:
        """What set ``named`` is scored under: its switched-off stages ``off`` (at their floors, ``zero`` at 0), the
        set's text levels of ``text_by_set`` and, for the text pass, the candidate ``levels`` under them."""
        def apply() -> Callable[[], None]:
            undos = [set_text_strengths(mix, te, levels or {}),
                     switch_off(mix, stages, off, min_strength if need is None else need, zero),
                     set_text_strengths(mix, te, set_levels.get(named, {}))]

            def undo_all() -> None:
                for undo in reversed(undos):
                    undo()
            return undo_all
        return apply

    judges = [Rollouts(compose, mix, by_named, lambda n, d=d: noise_of(n)[d], steps, batch, should_stop)
              for d in range(draws)]

    def scores(change: Callable[[frozenset[int], Any], Change]) -> tuple[StateScore, list[StateScore]]:
        """A pass's score on the first noise draw and on the held-back ones, a set's state read by ``change``."""
        return StateScore(judges[0], change), [StateScore(j, change) for j in judges[1:]]

    score, held = scores(state)

    per_expert = len(stages) * (2 if windows else 1)  # candidates of one expert's stage pass
    n_pass = sum(len(es) for es, _ in groups) * per_expert
    n_text = (sum(map(len, sets)) if text_by_set else len(experts)) * len(text_strengths)
    n_refine = sum(len(es) for es, _ in own) * per_expert if by_set == "refine" else 0
    placed_groups = shared if by_set == "off" else own  # the placement's groups: one per entry of the final offs
    n_place = sum(len(es) for es, _ in placed_groups) * len(stages) if place_floors else 0
    compositions = [s for s in sets if len(s) > 1]  # the sets that share floors (a single LoRA keeps its own)
    n_share = len(share_moves(experts, compositions, share_steps)) if share_floors else 0
    n_all = n_pass * rounds + n_text + n_refine + n_place + n_share

    def progress_from(done: int) -> Callable[[int, int], None]:
        def report(i: int, n: int) -> None:
            if progress is not None:
                progress(done + i, n_all)
        return report

    def stage_pass(groups: list, done: int, start_off: list[Switches] | None
                   ) -> tuple[list[Switches], float, float, bool]:
        """One stage pass per group; the switches per group, the summed start and final scores, completeness."""
        offs, start, total = [], 0.0, 0.0
        one_pass = greedy_windows if windows else greedy_search
        for g, (es, group_sets) in enumerate(groups):
            off, s0, s1, complete = one_pass(es, list(stages), group_sets, score, progress_from(done),
                                             should_stop, None if start_off is None else start_off[g], held, compare)
            offs.append(off)
            start, total, done = start + s0, total + s1, done + len(es) * per_expert
            if not complete:
                return offs + (start_off or [{}] * len(groups))[len(offs):], start, total, False
        return offs, start, total, True

    def off_of(offs: list[Switches], named: frozenset[int]) -> Switches:
        """A set's switches: its own (one entry per set) or the shared one (a single entry)."""
        off = offs[0] if len(offs) == 1 and len(sets) > 1 else offs[sets.index(named)]
        return {e: off.get(e, frozenset()) for e in named}

    def place(offs: list[Switches], needs: dict[frozenset[int], dict[int, float]], total: float, done: int
              ) -> tuple[list[Switches], float, bool]:
        """The floor placement pass (``place_floors``), per entry of ``offs`` over its own experts, each set keeping
        its ``needs`` (``share_floors``; else ``min_strength``): the zeroed stages per entry, the total score after
        it, completeness."""
        zero_score, zero_held = scores(lambda named, zero: state(named, off_of(offs, named), zero, needs.get(named)))

        out: list[Switches] = []
        for off, (es, group_sets) in zip(offs, placed_groups):
            need = needs.get(group_sets[0], {}) if len(group_sets) == 1 else {}  # shared: one need for every set
            placed, s0, s1, complete = greedy_additions(
                es, list(stages), group_sets, zero_score, progress_from(done), should_stop, zero_held, compare,
                allowed=lambda e, zs, off=off, need=need: can_zero(mix, stages, e, off.get(e, frozenset()), zs,
                                                                   need.get(e, min_strength)))
            out.append(placed)
            total, done = total + s1 - s0, done + len(es) * len(stages)
            if not complete:
                return out + [{} for _ in offs[len(out):]], total, False
        return out, total, True

    offs, start, total, complete = stage_pass(groups, 0, None)
    undo_off = (lambda: None) if groups is own else switch_off(mix, stages, offs[0], min_strength)
    chosen: Strengths = {}
    if text_strengths and complete:
        text_score, text_held = scores(lambda named, levels: state(named, off_of(offs, named), levels=levels))

        if text_by_set:  # each set its own levels, over its own experts
            done = n_pass
            for named in sets:
                levels, set_start, set_total, complete = greedy_strengths(
                    sorted(named), list(text_strengths), [named], text_score, progress_from(done), should_stop,
                    text_held, compare)
                total, done = total + set_total - set_start, done + len(named) * len(text_strengths)
                set_levels[named] = {e: lv for e, lv in levels.items() if lv != 1.0}
                if not complete:
                    break
        else:
            chosen, _, total, complete = greedy_strengths(experts, list(text_strengths), sets, text_score,
                                                          progress_from(n_pass), should_stop, text_held, compare)
            set_text_strengths(mix, te, chosen)
    for r in range(1, rounds):
        if not complete:
            break
        undo_off()  # the pass scores each switch from the mix without any: a stage may come back on
        offs, _, total, complete = stage_pass(groups, n_pass * r + n_text, offs)
        undo_off = (lambda: None) if groups is own else switch_off(mix, stages, offs[0], min_strength)
    if by_set == "refine" and complete:  # each set from the shared choice, flipping stages either way
        undo_off()
        offs, _, total, complete = stage_pass(own, n_pass * rounds + n_text, [off_of(offs, s) for s in sets])
    needs: dict[frozenset[int], dict[int, float]] = {}  # share_floors: each set's own floor needs
    if share_floors and complete:  # before the placement, which then places each set's own share
        share_score, share_held = scores(lambda named, need: state(named, off_of(offs, named), None, need))

        def feasible(named: frozenset[int], e: int, need: float) -> bool:
            return can_carry(mix, stages, e, off_of(offs, named)[e], frozenset(), need)

        needs, s0, s1, complete = greedy_shares(experts, compositions, min_strength, share_score, feasible,
                                                progress_from(n_all - n_place - n_share), should_stop, share_held,
                                                compare, share_steps)
        total += s1 - s0
    zeros: list[Switches] = [{} for _ in offs]  # place_floors: per entry of offs, the stages run at 0
    if place_floors and complete:
        undo_off()  # a shared choice is scored from the mix without its switches
        zeros, total, complete = place(offs, needs, total, n_all - n_place)
        if by_set == "off":
            switch_off(mix, stages, offs[0], min_strength, zeros[0])
    names = [e.name for e in mix.experts]

    def zero_of(named: frozenset[int]) -> Switches:
        """A set's zeroed stages (one entry per set, or the shared one)."""
        return {e: zs for e, zs in off_of(zeros, named).items() if zs}


    def named_stages(off: Switches) -> dict[str, list[str]]:
        return {names[e]: sorted(st.removeprefix("unet:") for st in sts) for e, sts in off.items() if sts}

    set_floors = {"+".join(names[e] for e in sorted(named)): {names[e]: round(f, 5) for e, f in
                                                              floors(mix, stages, off_of(offs, named),
                                                                     needs.get(named, min_strength),
                                                                     zero_of(named)).items() if f > 0}
                  for named in sets}
    if by_set != "off":
        write_set_scales(mix, stages, {named: off_of(offs, named) for named in sets}, min_strength,
                         {named: zero_of(named) for named in sets}, needs)
        write_set_text_scales(mix, te, set_levels)
    result = SearchResult({} if by_set != "off" else named_stages(offs[0]), start, total, n_all, complete,
                          {names[e]: lv for e, lv in chosen.items() if lv != 1.0},
                          {"+".join(names[e] for e in sorted(named)): named_stages(off_of(offs, named))
                           for named in sets} if by_set != "off" else {},
                          {"+".join(names[e] for e in sorted(named)): {names[e]: lv for e, lv in levels.items()}
                           for named, levels in set_levels.items() if levels},
                          {k: v for k, v in set_floors.items() if v},
                          {"+".join(names[e] for e in sorted(named)): named_stages(zero_of(named))
                           for named in sets if zero_of(named)},
                          {"+".join(names[e] for e in sorted(named)): {names[e]: round(v, 5) for e, v in need.items()
                                                                       if v != min_strength}
                           for named, need in needs.items() if any(v != min_strength for v in need.values())})
    text = result.text or result.text_by_set
    log.info("block search: %s%s%s%s%s (guide score %.4f → %.4f)",
             (result.by_set if by_set != "off" else result.off) or "every LoRA in every stage",
             f", text-encoder magnitudes {text}" if text else "",
             f", switched-off stages at {result.floors}" if result.floors else "",
             f", at 0 in {result.zeroed}" if result.zeroed else "",
             f", floor shares {result.shares}" if result.shares else "", start, total)
    return result
