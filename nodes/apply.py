"""MoLE Apply: mix the experts into a MODEL (and CLIP), gated or with fixed weights.

* ``gated``: a :class:`mole_core.Mixture` over the shared modules, switched on only while the
  returned clone is loaded (:mod:`.injection`); per-sample gates, so CFG's cond/uncond rows and every
  image of a batch get their own.
* ``uniform (NLA)`` / ``static weights``: fixed gates are merged into the weights with ComfyUI's
  ordinary weight patches — each expert's own ComfyUI LoRA patch, added per key with strength
  ``λ · s_i · w_i``. That is LoraLoader's arithmetic, so the result equals chained LoraLoaders
  (bit-for-bit when ``λ · s_i`` is 1) and costs nothing at sampling time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from comfy_api.latest import io, ui

import mole_core
from mole_core.checks import check_number
from mole_core.naming import execution_key

from .comfy_index import build_index
from .common import node_id, parse_floats, parse_mask
from .injection import MoleHolder, holder_of
from .types import ExpertsIO, GatesIO, MoleExperts, MoleGates, carry_over, merge_gate_files

MODES = {"gated": "gated", "uniform (NLA)": "uniform", "static weights": "static", "LoRA switch": "switch",
         "LoRA composite": "composite"}
TE = ("te", "te2")


def static_vector(mode: str, weights: list[float] | None, mask: list[bool]) -> list[float]:
    """Gate vector of the fixed modes: NLA ``1/N_on`` or the user's weights (masked experts get 0)."""
    if mode == "uniform":
        on = sum(mask)
        return [1.0 / on if m else 0.0 for m in mask]
    if weights is None:
        raise mole_core.MoleError("static weights mode needs `weights`: one number per expert, e.g. 0.6, 0.4")
    return [w if m else 0.0 for w, m in zip(weights, mask)]


def add_expert_patches(target: Any, experts: MoleExperts, coef: Callable[[int, str], float]) -> int:
    """Add every expert's ComfyUI patches to a ModelPatcher or CLIP with per-target strength
    ``coef(expert index, canonical name)``; keys the target does not have are skipped (as in
    ``load_lora_for_models``). Returns the number of patches accepted.

    Patches are grouped by strength (one ``add_patches`` call per expert and strength) and added
    in expert order, so each weight gets its experts in the same order as chained LoraLoaders.
    """
    accepted = 0
    for i, entry in enumerate(experts.entries):
        groups: dict[float, dict[str, Any]] = {}
        for canon, key in entry.model_keys.items():
            c = float(coef(i, canon))
            if c != 0.0:
                groups.setdefault(c, {})[key] = entry.patches[key]
        for c, patches in groups.items():
            accepted += len(target.add_patches(patches, c))
    return accepted


def apply_static(model: Any, clip: Any, experts: MoleExperts, vector: list[float], strength: float,
                 per_scope: dict[str, list[float]] | None = None, granularity: str = "block") -> tuple[Any, Any]:
    """Clones of ``model`` / ``clip`` with the fixed mixture merged in through weight patches.

    ``per_scope`` (bake): a gate vector per scope instead of the single ``vector``.
    """
    scales = [strength * e.strength for e in experts.entries]

    def coef(i: int, canon: str) -> float:
        if per_scope is None:
            return scales[i] * vector[i]
        weights = per_scope.get(mole_core.scope_of(canon, granularity))
        return scales[i] * weights[i] if weights is not None else 0.0

    m = model.clone()
    if add_expert_patches(m, experts, coef) == 0 and per_scope is None and experts.has_component("unet"):
        raise mole_core.MoleError("none of the experts' UNet targets exist in `model`: were the experts loaded "
                                  "for another model family?")
    c = None
    if clip is not None:
        c = clip.clone()
        add_expert_patches(c, experts, coef)
    return m, c


def static_clip(clip: Any, experts: MoleExperts, vector: list[float], strength: float = 1.0) -> Any:
    """A clone of ``clip`` with only the experts' text-encoder parts merged at fixed weights."""
    scales = [strength * e.strength * w for e, w in zip(experts.entries, vector)]
    c = clip.clone()
    add_expert_patches(c, experts, lambda i, canon: scales[i] if canon.split(":", 1)[0] in TE else 0.0)
    return c


def _mixture(index: mole_core.ModelIndex, experts: MoleExperts, gate_file: mole_core.GateFile | None,
             mask: list[bool], strength: float, components: list[str],
             routes: mole_core.RouteTable | None = None) -> mole_core.Mixture:
    # hooks go on only while the MoLE clone is loaded (PatcherInjection)
    return mole_core.attach(index, experts.experts(), gates=gate_file, mode="gated", mask=mask, strength=strength,
                            components=components, hooks=False, routes=routes)


def apply_gated(model: Any, clip: Any, experts: MoleExperts, gates: MoleGates | None, mask: list[bool],
                strength: float, buckets: int, nid: str | None) -> tuple[Any, Any, MoleGates]:
    """Clones of ``model`` / ``clip`` carrying a gated mixture (hooks injected while loaded)."""
    for name, patcher in (("model", model), ("clip", getattr(clip, "patcher", None))):
        existing = holder_of(patcher) if patcher is not None else None
        if existing is not None:
            raise mole_core.MoleError(f"`{name}` already carries a gated MoLE (MoLE Apply #{existing.node_id}); "
                                      f"connect the {name} from before that node (one gated MoLE per model)")
    gate_file = gates.gate_file if gates is not None else None
    if gates is not None and gate_file is None:
        raise mole_core.MoleError(f"`gates` from {gates.source or 'a static MoLE'} hold fixed weights, not "
                                  "trained gates: load a gate file for gated mode")
    m, c, te_holder = model.clone(), clip, None
    if clip is not None and experts.has_component(*TE):
        index = build_index(clip=clip)[0]
        comps = [k for k in TE if k in index.roots]
        if gate_file is not None and not set(gate_file.components()) & set(comps):
            # UNet-only gates (MoLE Train Gates, the CLI): the text-encoder parts are mixed at uniform
            # weights, exactly as the trainer mixed them while the gates learned
            c = static_clip(clip, experts, static_vector("uniform", None, mask), strength)
        else:
            te_holder = MoleHolder(_mixture(index, experts, gate_file, mask, strength, comps), "te", nid, 1,
                                   experts.names)
            c = clip.clone()
            te_holder.install(c.patcher, sampling=False)
    # gate_input "router": the router runs in the text encoder; the UNet finds each prompt's decision by its
    # conditioning in the text encoders' route table
    routes = te_holder.mix.routes if te_holder is not None and te_holder.mix.routed else None
    unet_mix = _mixture(build_index(model=model)[0], experts, gate_file, mask, strength, ["unet"], routes)
    holders = [MoleHolder(unet_mix, "unet", nid, buckets, experts.names)]
    holders[0].install(m)
    if te_holder is not None:
        holders.append(te_holder)
    snapshot = merge_gate_files([mole_core.snapshot(h.mix) for h in holders])
    if gate_file is not None:
        snapshot = carry_over(snapshot, gate_file)
    source = f"MoLE Apply #{nid}" if nid is not None else "MoLE Apply"
    return m, c, MoleGates(snapshot, experts.names, holders, source=source)


def apply_method(model: Any, clip: Any, experts: MoleExperts, method: str, mask: list[bool], strength: float,
                 switch_every: int, buckets: int, nid: str | None) -> tuple[Any, Any, MoleGates]:
    """Clones carrying LoRA Switch or LoRA Composite on the UNet (:mod:`.injection`); the text-encoder
    parts are merged at uniform weights (NLA), as in the CLI."""
    existing = holder_of(model)
    if existing is not None:
        raise mole_core.MoleError(f"`model` already carries a MoLE (MoLE Apply #{existing.node_id}); connect the "
                                  "model from before that node")
    if switch_every < 1:
        raise mole_core.MoleError(f"`switch_every` must be ≥ 1, got {switch_every}")
    m = model.clone()
    mix = mole_core.attach(build_index(model=model)[0], experts.experts(), mode="uniform", mask=mask,
                           strength=strength, components=["unet"], hooks=False)
    holder = MoleHolder(mix, "unet", nid, buckets, experts.names, method=method, switch_every=switch_every)
    holder.install(m)
    c = clip
    if clip is not None and experts.has_component(*TE):
        c = static_clip(clip, experts, static_vector("uniform", None, mask), strength)
    # no gate tensors (nothing to save or bake); statistics after sampling, the mean over a cycle (1/N) before
    table = fixed_gates(experts, static_vector("uniform", None, mask), False, nid)
    return m, c, MoleGates(None, experts.names, [holder], fixed=table.fixed, source=f"{table.source} ({method})")


def fixed_gates(experts: MoleExperts, vector: list[float], with_clip: bool, nid: str | None) -> MoleGates:
    """The fixed modes' weights as a per-block table (for Visualize Gates)."""
    comps = ("unet", *TE) if with_clip else ("unet",)
    scopes = {mole_core.scope_of(c, "block") for e in experts.entries for c in e.model_keys
              if c.split(":", 1)[0] in comps}
    fixed = {s: list(vector) for s in sorted(scopes, key=execution_key)}
    return MoleGates(None, experts.names, fixed=fixed, source=f"MoLE Apply #{nid}" if nid else "MoLE Apply")


class MoleApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoLE_Apply", display_name="MoLE Apply", category="MoLE", is_experimental=True,
            description="Mixes the LoRA experts into the model: learned gates per UNet block (gated) or fixed "
                        "weights merged into the weights (uniform / static). The input model is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to mix the experts into. It is not changed: "
                                                "a patched copy comes out."),
                ExpertsIO.Input("experts", tooltip="The LoRA experts from MoLE Load Experts (their order is the "
                                                   "gate order)."),
                io.Combo.Input("mode", options=list(MODES), default="gated",
                               tooltip="gated: learned per-image gates per UNet block (from `gates`; without gates "
                                       "they start uniform). uniform (NLA): every expert on gets 1/N. static "
                                       "weights: the `weights` below (these two are merged into the weights and "
                                       "cost nothing while sampling). LoRA switch: one expert at a time, the next "
                                       "every `switch_every` sampling steps. LoRA composite: every expert's own "
                                       "CFG prediction, averaged (one batched UNet call of N times the batch). "
                                       "The last two are training-free (Zhong et al. 2024); the CLIP gets the "
                                       "text parts at 1/N."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Mixture strength: multiplies the whole mixture (1 = as trained)."),
                io.String.Input("weights", default="",
                                tooltip="static weights mode only: one number per expert, in order, e.g. 0.6, 0.4."),
                io.String.Input("mask", default="",
                                tooltip="Which experts are on, e.g. 1, 0, 1. Empty: the on/off switches of Load "
                                        "Experts. Gated mode renormalises the remaining gates (no retraining)."),
                io.Int.Input("timestep_buckets", default=4, min=1, max=20,
                             tooltip="Gated mode: the gate statistics of the last sampling run are grouped into "
                                     "this many timestep ranges (shown by MoLE Visualize Gates)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional CLIP: the experts' text-encoder parts are applied to it as well "
                                      "(at uniform weights when the gates have no text-encoder gates, as "
                                      "MoLE Train Gates trains them)."),
                GatesIO.Input("gates", optional=True,
                              tooltip="Trained gates for gated mode (MoLE Load Gates); they must be for these "
                                      "experts, in this order."),
                io.Int.Input("switch_every", default=1, min=1, max=1000, optional=True,
                             tooltip="LoRA switch: sampling step s uses expert (s // switch_every) mod N, cycling "
                                     "through the experts that are on (a sampler's extra model calls inside a "
                                     "step stay on that step)."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
                     GatesIO.Output(display_name="gates",
                                    tooltip="The gates in use; after sampling they carry the recorded gate "
                                            "statistics (for Visualize Gates, Save Gates and Bake).")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model: Any, experts: MoleExperts, mode: str, strength: float, weights: str, mask: str,
                timestep_buckets: int, clip: Any = None, gates: MoleGates | None = None,
                switch_every: int = 1) -> io.NodeOutput:
        if mode not in MODES:
            raise mole_core.MoleError(f"`mode` must be one of {list(MODES)}, got {mode!r}")
        kind, nid = MODES[mode], node_id(cls)
        strength = check_number(strength, "`strength`", lo=-10, hi=10)
        on = parse_mask(mask, [e.enabled for e in experts.entries], experts.names)
        if kind == "gated":
            m, c, out_gates = apply_gated(model, clip, experts, gates, on, strength, timestep_buckets, nid)
        elif kind in mole_core.METHODS:
            m, c, out_gates = apply_method(model, clip, experts, kind, on, strength, switch_every, timestep_buckets,
                                           nid)
        else:
            w = parse_floats(weights, "weights", len(experts), experts.names) if kind == "static" else None
            vector = static_vector(kind, w, on)
            m, c = apply_static(model, clip, experts, vector, strength)
            out_gates = fixed_gates(experts, vector, clip is not None, nid)
        text = f"{mode}: {len(experts)} experts ({', '.join(experts.names)}), strength {strength:g}"
        return io.NodeOutput(m, c, out_gates, ui=ui.PreviewText(text))
