"""MoLE Bake: merge the mean mixture into a model (zero runtime cost), optionally save it as one LoRA.

The mixture's gate per block (the mean gate recorded while sampling, or fixed uniform/static
weights) becomes a per-key strength of each expert's own ComfyUI LoRA patch — the same merge as
static mode. The exported LoRA (``models/loras``, kohya names) is the exact rank-ΣR concatenation
of the experts with those coefficients, and the LoRA-Block-Weight text gives each expert's
per-block strengths for Inspire-Pack users.
"""

from __future__ import annotations

import os
from typing import Any

import folder_paths
from comfy_api.latest import io, ui

import mole_core
from mole_core.bake import export_lora
from mole_core.checks import check_number
from mole_core.paths import path_inside

from .apply import TE, apply_static, static_vector
from .comfy_index import build_index
from .common import check_relative_name, parse_floats
from .injection import holder_of
from .lbw import lbw_text
from .types import ExpertsIO, GatesIO, MoleExperts, MoleGates

SOURCES = {"recorded gate statistics": "recorded", "uniform (NLA)": "uniform", "static weights": "static"}


def check_same_experts(gates: MoleGates, experts: MoleExperts) -> None:
    """Raise a one-line MoleError when gates were made for other experts (by sha256 and order)."""
    if gates.gate_file is None:
        return
    want = [(e.get("name", "?"), e.get("sha256", "")) for e in gates.gate_file.experts]
    have = [(e.name, e.sha256) for e in experts.entries]
    if [h for _, h in want] != [h for _, h in have]:
        raise mole_core.MoleError(f"`gates` ({gates.source}) are for experts {[n for n, _ in want]}, "
                                  f"got {[n for n, _ in have]} (files or order differ)")


def bake_weights(source: str, experts: MoleExperts, gates: MoleGates | None, weights: str
                 ) -> tuple[list[float] | None, dict[str, list[float]] | None, str]:
    """``(vector, per_scope, granularity)``: one fixed vector, or the recorded mean gate per scope."""
    on = [e.enabled for e in experts.entries]
    if source == "uniform":
        return static_vector("uniform", None, on), None, "block"
    if source == "static":
        return static_vector("static", parse_floats(weights, "weights", len(experts), experts.names), on), None, "block"
    stats = gates.statistics() if gates is not None else None
    if not stats or not stats.get("mean"):
        raise mole_core.MoleError("no recorded gate statistics: connect `gates` from MoLE Apply (gated) after a "
                                  "sampling run, or gates saved with statistics")
    check_same_experts(gates, experts)
    granularity = gates.gate_file.config.granularity if gates.gate_file is not None else "block"
    return None, dict(stats["mean"]), granularity


def export(model: Any, clip: Any, experts: MoleExperts, vector: list[float] | None,
           per_scope: dict[str, list[float]] | None, granularity: str, strength: float, prefix: str) -> str:
    """Write the baked mixture as one kohya LoRA into ``models/loras``; returns its relative name."""
    check_relative_name(prefix, "filename_prefix", "models/loras")
    base = folder_paths.get_folder_paths("loras")[0]
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, base)
    file = f"{name}_{counter:05}_.safetensors"
    rel = f"{subfolder}/{file}" if subfolder else file
    path = path_inside(base, rel, "filename_prefix", "models/loras")  # before any work
    index = build_index(model=model, clip=clip if clip is not None and experts.has_component(*TE) else None)[0]
    comps = [c for c in ("unet", *TE) if c in index.roots and experts.has_component(c)]
    mode = "gated" if per_scope is not None else "static"
    mix = mole_core.attach(index, experts.experts(), mole_core.GateConfig(granularity=granularity), mode=mode,
                           weights=vector, strength=strength, components=comps, hooks=False)
    full = None
    if per_scope is not None:
        zeros = [0.0] * len(experts)
        full = {s: per_scope.get(s, zeros) for s in mix.scopes}
    os.makedirs(folder, exist_ok=True)
    export_lora(mix, path, per_scope=full)
    return rel


class MoleBake(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoLE_Bake", display_name="MoLE Bake", category="MoLE", is_experimental=True,
            is_output_node=True,
            description="Merges the mean mixture into the model (no runtime cost): per block, each expert at its "
                        "mean gate. Can save it as one standard LoRA and gives LoRA-Block-Weight vectors.",
            inputs=[
                io.Model.Input("model", tooltip="The model to merge into: the one that went INTO MoLE Apply "
                                                "(not its output)."),
                ExpertsIO.Input("experts", tooltip="The experts (same order as the gates)."),
                io.Combo.Input("weights_from", options=list(SOURCES), default="recorded gate statistics",
                               tooltip="recorded gate statistics: each block's mean gate of the last sampling run "
                                       "(calibration). uniform (NLA): 1/N. static weights: the `weights` below."),
                io.String.Input("weights", default="", tooltip="static weights only: one number per expert."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Mixture strength: multiplies the whole merged mixture."),
                io.Boolean.Input("save_lora", default=False,
                                 tooltip="Also save the merged mixture as one LoRA file in models/loras."),
                io.String.Input("filename_prefix", default="mole/baked",
                                tooltip="Name of the saved LoRA inside models/loras (a counter is added)."),
                io.Clip.Input("clip", optional=True, tooltip="Optional CLIP: merge the text-encoder parts too."),
                GatesIO.Input("gates", optional=True,
                              tooltip="For recorded statistics: MoLE Apply's gates after sampling, or gates saved "
                                      "with statistics."),
                io.Latent.Input("samples", optional=True,
                                tooltip="Connect the sampler's output so this node runs after the calibration run."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
                     io.String.Output(display_name="block_weights",
                                      tooltip="Per-expert LoRA Block Weight vectors (Inspire-Pack format, "
                                              "name:BASE,blocks…; use strength 1)."),
                     io.String.Output(display_name="lora_file", tooltip="The saved LoRA's name (empty if not saved).")],
        )

    @classmethod
    def execute(cls, model: Any, experts: MoleExperts, weights_from: str, weights: str, strength: float,
                save_lora: bool, filename_prefix: str, clip: Any = None, gates: MoleGates | None = None,
                samples: Any = None) -> io.NodeOutput:
        if holder_of(model) is not None:
            raise mole_core.MoleError("`model` is the output of a gated MoLE Apply: connect the model that went "
                                      "into MoLE Apply instead")
        if weights_from not in SOURCES:
            raise mole_core.MoleError(f"`weights_from` must be one of {list(SOURCES)}, got {weights_from!r}")
        strength = check_number(strength, "`strength`", lo=-10, hi=10)
        vector, per_scope, granularity = bake_weights(SOURCES[weights_from], experts, gates, weights)
        m, c = apply_static(model, clip, experts, vector or [], strength, per_scope, granularity)
        coef = _coef(experts, vector, per_scope, granularity, strength, clip is not None)
        saved = export(model, clip, experts, vector, per_scope, granularity, strength, filename_prefix) \
            if save_lora else ""
        text = lbw_text(experts, coef)
        return io.NodeOutput(m, c, text, saved, ui=ui.PreviewText(text + (f"\nsaved {saved}" if saved else "")))


def _coef(experts: MoleExperts, vector: list[float] | None, per_scope: dict[str, list[float]] | None,
          granularity: str, strength: float, with_clip: bool):
    """Merged coefficient of (expert, target), None where nothing was merged (for the LBW text)."""
    def coef(i: int, canon: str) -> float | None:
        if canon.split(":", 1)[0] in TE and not with_clip:
            return None
        w = vector if per_scope is None else per_scope.get(mole_core.scope_of(canon, granularity))
        return None if w is None else strength * experts.entries[i].strength * w[i]
    return coef
