"""Gated MoLE on a ComfyUI ``ModelPatcher`` clone: injection life cycle and gate statistics.

Life cycle: one :class:`mole_core.Mixture` is built over the modules of
the shared ``BaseModel`` and immediately detached. The clone carries a ``PatcherInjection`` whose
``inject`` re-installs the mixture's forward hooks and whose ``eject`` removes them; ComfyUI calls
them when *this* clone is loaded / unloaded (``load_models_gpu``, ``detach``, lowvram reloads,
state-dict operations through ``use_ejected``). Every other clone of the model, the input model
included, therefore runs without hooks. Weights, state-dict keys and the module tree never change.

Statistics: an ``OUTER_SAMPLE`` wrapper resets :attr:`Mixture.stats` at the start of every sampling
run and stores its summary at the end (:attr:`MoleHolder.last_summary`, plus :data:`LAST_RUNS` keyed
by the MoLE Apply node id); a ``DIFFUSION_MODEL`` wrapper sets the timestep bucket before every
UNet call. All three are keyed ``"mole"``.

LoRA Switch and LoRA Composite (:mod:`mole_core.methods`) run in the same ``DIFFUSION_MODEL`` wrapper, so
they work under every sampler, scheduler and CFG function: Switch maps the call's sigma to a sampling step
(:func:`sampling_step`) and sets that step's one-hot gates; Composite repeats the call's batch once per
expert that is on, with one-hot gates per block, and averages the blocks, so the sampler's CFG yields
the average of the experts' own guided predictions (CFG is linear) from one batched UNet call.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from comfy.patcher_extension import PatcherInjection, WrappersMP

import mole_core
from mole_core.methods import repeat_batch, start_composite_call, start_switch_step, step_labels
from mole_core.stats import bucket_labels, timestep_bucket

log = logging.getLogger(__name__)

KEY = "mole"
UNET_ARGS = ("context", "y", "control", "transformer_options")  # UNetModel.forward after (x, timesteps)
T_MAX = 1000.0  # ComfyUI's UNet timesteps run over [0, 1000) for SD-family models
LAST_RUNS: dict[str, dict] = {}  # MoLE Apply node id → its last sampling run (``GET /mole/runs/{node}``)
MAX_RUNS = 256  # node ids kept: the oldest run is dropped beyond this


def sampling_step(transformer_options: dict) -> int:
    """The sampling step of a model call: ``i`` with ``σ_i ≥ σ > σ_{i+1}`` in the sampler's schedule
    (``sample_sigmas``). A sampler that calls the model several times per step at sigmas inside
    ``(σ_{i+1}, σ_i]`` stays on step ``i``; a call exactly at ``σ_{i+1}`` (Heun's second evaluation)
    counts as step ``i + 1``. 0 outside a sampler."""
    sched, sigma = transformer_options.get("sample_sigmas"), transformer_options.get("sigmas")
    if not isinstance(sched, torch.Tensor) or not isinstance(sigma, torch.Tensor) or sched.numel() < 2:
        return 0
    s = float(sigma.flatten()[0])
    above = sched[:-1].float() >= s * (1 - 1e-5)
    return max(0, int(above.sum()) - 1)


class MoleHolder:
    """Runtime state of one gated mixture on a patcher (and on the clones made from it).

    Clones of the patcher share the holder on purpose: a MoLE model passed through another
    model node (sampling shift, CFG tweaks…) still records into the same statistics.
    """

    def __init__(self, mix: mole_core.Mixture, component: str, node_id: str | None = None, buckets: int = 4,
                 expert_names: list[str] | None = None, method: str = "gated", switch_every: int = 1):
        self.mix = mix
        self.method = method  # gated | switch | composite
        self.switch_every = switch_every
        self.component = component
        self.node_id = node_id
        self.buckets = max(1, int(buckets))
        self.expert_names = expert_names or [e.name for e in mix.experts]
        self.last_summary: dict | None = None
        self.runs = 0
        self.sampling = component == "unet"

    def __repr__(self) -> str:
        return f"MoleHolder({self.component}, MoLE Apply #{self.node_id}, {len(self.expert_names)} experts)"

    # ----- ComfyUI plumbing -----
    def clone(self) -> MoleHolder:
        return self

    def __deepcopy__(self, memo: dict) -> MoleHolder:  # model_options are deep-copied on clone()
        return self

    def reset(self) -> None:
        """Forget recorded statistics (start of a sampling run)."""
        self.mix.stats.reset()
        self.mix.stats.bucket = 0

    def inject(self, patcher: Any) -> None:
        self.mix.to(patcher.load_device)
        self.mix.reattach()

    def eject(self, patcher: Any) -> None:
        self.mix.detach()  # idempotent: clones share this injection and ComfyUI may eject twice

    def install(self, patcher: Any, *, sampling: bool = True) -> None:
        """Put the injection (and, for the UNet, the statistics wrappers) on a fresh clone."""
        self.sampling = sampling
        patcher.set_injections(KEY, [PatcherInjection(self.inject, self.eject)])
        patcher.set_attachments(KEY, self)
        if sampling:
            patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, self.outer_sample_wrapper)
            patcher.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, self.diffusion_model_wrapper)

    # ----- wrappers -----
    def outer_sample_wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        self.reset()
        try:
            return executor(*args, **kwargs)
        finally:
            self.finish_run()

    def diffusion_model_wrapper(self, executor: Any, x: torch.Tensor, timesteps: Any, *args: Any,
                                **kwargs: Any) -> Any:
        if self.method == "gated":
            # reading the timestep is a host sync (a graph break under torch.compile): compiled runs record
            # their statistics without timestep buckets
            if timesteps is not None and not torch.compiler.is_compiling():
                self.mix.stats.bucket = timestep_bucket(timesteps, self.buckets, T_MAX)
            return executor(x, timesteps, *args, **kwargs)
        # UNetModel.forward passes (x, timesteps, context, y, control, transformer_options) positionally
        kwargs = {**dict(zip(UNET_ARGS, args)), **kwargs}
        if self.method == "switch":
            start_switch_step(self.mix, sampling_step(kwargs.get("transformer_options") or {}), self.switch_every)
            return executor(x, timesteps, **kwargs)
        if timesteps is not None:
            self.mix.stats.bucket = timestep_bucket(timesteps, self.buckets, T_MAX)
        if self.method == "composite":
            batch = x.shape[0]
            blocks = start_composite_call(self.mix, batch)
            opts = kwargs.pop("transformer_options", None)  # not repeated: ComfyUI's per-call options
            out = executor(*repeat_batch([x, timesteps], batch, blocks), transformer_options=opts,
                           **repeat_batch(kwargs, batch, blocks))
            return mole_core.average_blocks(out, blocks)
        raise mole_core.MoleError(f"unknown MoLE method {self.method!r}")

    def summary(self) -> dict | None:
        """Statistics to show: the last sampling run (UNet) or everything encoded so far (CLIP)."""
        if self.sampling:
            return self.last_summary
        return None if self.mix.stats.empty else self.mix.stats.summary()

    def finish_run(self) -> dict:
        """Store the summary of the statistics recorded since :meth:`reset`."""
        summary = self.mix.stats.summary()
        if self.method == "switch":  # one bucket per sampling step
            summary["bucket_labels"] = step_labels(summary.get("by_bucket", {}))
        else:
            summary["bucket_labels"] = bucket_labels(self.buckets, T_MAX)
        self.last_summary = summary
        self.runs += 1
        if self.node_id is not None:
            LAST_RUNS.pop(str(self.node_id), None)  # re-inserted last: dicts keep insertion order
            LAST_RUNS[str(self.node_id)] = {"experts": list(self.expert_names), "summary": summary,
                                            "time": time.time(), "component": self.component}
            while len(LAST_RUNS) > MAX_RUNS:
                LAST_RUNS.pop(next(iter(LAST_RUNS)))
        return summary


def holder_of(patcher: Any) -> MoleHolder | None:
    """The gated MoLE holder of a MODEL/CLIP patcher, if any."""
    get = getattr(patcher, "get_attachment", None)
    return get(KEY) if get is not None else None


def last_run(node_id: str) -> dict | None:
    """Summary of the last sampling run of the MoLE Apply node ``node_id`` (``GET /mole/runs/{node}``)."""
    return LAST_RUNS.get(str(node_id))
