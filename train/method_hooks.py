"""LoRA Switch and LoRA Composite (:mod:`mole_core.methods`) on a diffusers UNet.

A forward pre-hook on the UNet sets the mixture's row gates before every call:

* ``switch``: the sampling step is the index of the call's timestep in ``scheduler.timesteps`` (a
  scheduler that calls the UNet twice per step, e.g. Heun, lists the timestep twice: its calls are counted
  as the steps it lists); the step's one-hot gates go on, and the statistics bucket is that step.
* ``composite``: every batch-first tensor of the call (latents, prompt embeddings, SDXL's added
  conditions) is repeated once per expert that is on, block ``k`` gets expert ``k``'s one-hot gates, and
  a forward hook averages the blocks of the output: one batched UNet call per step.

The text encoders are not touched here: the hosts mix the LoRAs' text parts at 1/N (NLA).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from mole_core import METHODS, Mixture, MoleError, average_blocks
from mole_core.methods import repeat_batch, start_composite_call, start_switch_step


class MethodHooks:
    """Installs Switch or Composite on ``unet`` for ``mix`` (the UNet mixture); :meth:`detach` when done.

    ``steps`` records the expert of every Switch call (for the image's info and the tests)."""

    def __init__(self, unet: torch.nn.Module, mix: Mixture, method: str, timesteps: Any, every: int = 1):
        if method not in METHODS:
            raise MoleError(f"`method` must be one of {METHODS}, got {method!r}")
        self.mix, self.method, self.every, self.timesteps = mix, method, every, timesteps
        self.steps: list[int] = []
        self._blocks = 1
        self._handles: list[RemovableHandle] = [unet.register_forward_pre_hook(self._pre, with_kwargs=True)]
        if method == "composite":
            self._handles.append(unet.register_forward_hook(self._post))

    def step_of(self, t: Any) -> int:
        """Index of timestep ``t`` in the scheduler's timesteps (nearest when not listed)."""
        ts = torch.as_tensor(self.timesteps() if callable(self.timesteps) else self.timesteps).float().flatten()
        tv = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        return int((ts - tv).abs().argmin())

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sample = args[0] if args else kwargs["sample"]
        if self.method == "switch":
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            self.steps.append(start_switch_step(self.mix, self.step_of(t), self.every))
            return args, kwargs
        batch = sample.shape[0]
        self._blocks = start_composite_call(self.mix, batch)
        return repeat_batch(args, batch, self._blocks), repeat_batch(kwargs, batch, self._blocks)

    def _post(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (average_blocks(output[0], self._blocks), *output[1:])
        if hasattr(output, "sample"):
            output.sample = average_blocks(output.sample, self._blocks)
            return output
        return average_blocks(output, self._blocks)

    def detach(self) -> None:
        """Remove the hooks and the row gates (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        self.mix.set_row_gates(None)
