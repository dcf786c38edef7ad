"""The training-free composition methods of Zhong et al. (2024), as gate rows for a :class:`Mixture`.

* **LoRA Switch**: one expert at a time, the next every ``every`` denoising steps, cycling through the
  experts that are on: sampling step ``s`` uses expert ``on[(s // every) mod N_on]``.
* **LoRA Composite**: each expert's own classifier-free-guided prediction, averaged. CFG is linear, so
  ``mean_e(u_e + w (c_e − u_e)) = ū + w (c̄ − ū)``: the host repeats the model's batch once per expert
  that is on, gives block ``e`` the one-hot gates of expert ``e`` (:func:`composite_rows`), runs **one**
  forward and averages the blocks (:func:`average_blocks`); the sampler's own CFG then yields the average
  of the per-expert guided predictions, whatever the sampler, scheduler or CFG function.

Both run through :meth:`Mixture.set_row_gates` on a mixture attached in any fixed mode. Hosts decide how a
model call maps to a sampling step (diffusers: the scheduler's timestep index; ComfyUI: the sigma schedule).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .errors import MoleError

if TYPE_CHECKING:
    from .mixture import Mixture

METHODS = ("switch", "composite")


def experts_on(mask: list[bool]) -> list[int]:
    """Indices of the experts that are on (at least one)."""
    on = [i for i, m in enumerate(mask) if m]
    if not on:
        raise MoleError("`mask` switches every expert off; keep at least one")
    return on


def switch_expert(step: int, every: int, mask: list[bool]) -> int:
    """The expert LoRA Switch uses at sampling step ``step`` (0-based)."""
    if every < 1:
        raise MoleError(f"`switch_every` must be ≥ 1, got {every}")
    on = experts_on(mask)
    return on[(max(0, int(step)) // every) % len(on)]


def one_hot(n: int, expert: int) -> torch.Tensor:
    """Gate row ``(1, N)`` with expert ``expert`` at 1."""
    g = torch.zeros(1, n)
    g[0, expert] = 1.0
    return g


def switch_rows(step: int, every: int, mask: list[bool]) -> torch.Tensor:
    """LoRA Switch's gates ``(1, N)`` at sampling step ``step``."""
    return one_hot(len(mask), switch_expert(step, every, mask))


def composite_rows(mask: list[bool], batch: int) -> torch.Tensor:
    """LoRA Composite's gates ``(N_on · batch, N)``: block ``k`` (rows ``k·batch … (k+1)·batch − 1``) holds the
    one-hot gates of the ``k``-th expert that is on."""
    on = experts_on(mask)
    return torch.cat([one_hot(len(mask), e).expand(batch, -1) for e in on])


def repeat_blocks(x: torch.Tensor, blocks: int) -> torch.Tensor:
    """``x`` repeated ``blocks`` times along the batch (block-major, as :func:`composite_rows` expects)."""
    return torch.cat([x] * blocks) if blocks > 1 else x


def repeat_batch(value: Any, batch: int, blocks: int) -> Any:
    """Every batch-first tensor in ``value`` (a tensor, or dicts/lists/tuples of them: conditioning, SDXL's added
    conditions, ControlNet residuals) repeated ``blocks`` times; other values unchanged."""
    if isinstance(value, torch.Tensor):
        return repeat_blocks(value, blocks) if value.dim() >= 1 and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: repeat_batch(v, batch, blocks) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(repeat_batch(v, batch, blocks) for v in value)
    return value


def average_blocks(out: torch.Tensor, blocks: int) -> torch.Tensor:
    """Mean of the ``blocks`` batch blocks of ``out`` (the inverse of :func:`repeat_blocks` for equal blocks)."""
    if blocks == 1:
        return out
    if out.shape[0] % blocks:
        raise MoleError(f"LoRA Composite: the model returned {out.shape[0]} rows for {blocks} expert blocks")
    return out.reshape(blocks, out.shape[0] // blocks, *out.shape[1:]).mean(0)


def start_switch_step(mix: Mixture, step: int, every: int) -> int:
    """Before a model call of sampling step ``step``: LoRA Switch's one-hot gates on ``mix`` and its statistics
    filed under that step (one heatmap column per step). Returns the expert."""
    expert = switch_expert(step, every, mix.mask)
    mix.stats.bucket = step
    mix.set_row_gates(one_hot(mix.n, expert))
    return expert


def start_composite_call(mix: Mixture, batch: int) -> int:
    """Before a model call of ``batch`` rows: LoRA Composite's one-hot rows on ``mix``. Returns the number of
    blocks the host repeats the call's batch-first inputs into (:func:`repeat_batch`) and averages
    (:func:`average_blocks`)."""
    rows = composite_rows(mix.mask, batch)
    mix.set_row_gates(rows)
    return rows.shape[0] // batch


def step_labels(by_bucket: dict) -> dict[str, str]:
    """Heatmap labels of LoRA Switch's per-step statistics buckets."""
    return {str(b): f"step {b}" for b in by_bucket}
