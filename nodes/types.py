"""Payloads that travel between MoLE nodes: ``MOLE_EXPERTS`` and ``MOLE_GATES``.

Both are plain Python objects passed by reference through ComfyUI's executor (never serialised):
nodes must treat them as read-only and build new ones instead of mutating them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from comfy_api.latest import io

import mole_core

if TYPE_CHECKING:
    from .injection import MoleHolder

ExpertsIO = io.Custom("MOLE_EXPERTS")
GatesIO = io.Custom("MOLE_GATES")

MAX_EXPERTS = 8


@dataclass(repr=False)
class ExpertEntry:
    """One LoRA file as an expert, in both shapes the nodes need.

    Attributes:
        name: file name relative to ``models/loras`` (shown in reports, gate files, heatmaps).
        sha256: sha256 of the file (gate files check experts by it).
        strength: per-expert strength ``s_i``.
        enabled: on/off (the default mask of MoLE Apply).
        expert: canonical low-rank factors (``unet:<diffusers path>``, ``te:...``) for gated mode,
            gate files and LoRA export; its own ``strength`` stays 1 (``s_i`` is applied by the nodes).
        patches: ComfyUI model key → ComfyUI patch exactly as ``comfy.lora.load_lora`` returned it
            (static mode and bake add these with per-key strengths: LoraLoader's own maths).
        model_keys: canonical name → ComfyUI model key (``diffusion_model.….weight``, ``clip_l.….weight``).
        report: one line, e.g. ``a.safetensors: 176 UNet + 12 text-encoder targets``.
    """

    name: str
    path: str
    sha256: str
    strength: float
    enabled: bool
    expert: mole_core.Expert
    patches: dict[str, Any]
    model_keys: dict[str, str]
    report: str

    def components(self) -> set[str]:
        return {c.split(":", 1)[0] for c in self.model_keys}

    def __repr__(self) -> str:  # ComfyUI prints node inputs in error reports: never dump tensors
        state = "" if self.enabled else ", off"
        return f"{self.name} (strength {self.strength:g}{state}, {len(self.model_keys)} targets)"


@dataclass(repr=False)
class MoleExperts:
    """An ordered list of experts (order = gate order; at most :data:`MAX_EXPERTS`)."""

    entries: list[ExpertEntry]
    family: str = "unknown"
    with_clip: bool = False

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def experts(self) -> list[mole_core.Expert]:
        """Fresh :class:`mole_core.Expert` objects (shared factors) carrying strength and on/off,
        so a Mixture can change them without touching this payload."""
        return [dataclasses.replace(e.expert, strength=e.strength, enabled=e.enabled) for e in self.entries]

    def has_component(self, *components: str) -> bool:
        return any(e.components() & set(components) for e in self.entries)

    def __repr__(self) -> str:
        return f"MOLE_EXPERTS[{'; '.join(repr(e) for e in self.entries)}]"


@dataclass(repr=False)
class MoleGates:
    """Gates and/or gate statistics.

    Attributes:
        gate_file: gate tensors + metadata (``None`` for static/uniform weights, which have no gates).
        expert_names: expert names in gate order.
        holders: the live mixtures of a gated MoLE Apply; their recorded statistics (last sampling
            run) are read when the payload is used, not when it was created.
        fixed: static/uniform mode: weight vector per scope.
        source: where it came from, for messages (``gate file x.safetensors``, ``MoLE Apply #12``).
    """

    gate_file: mole_core.GateFile | None
    expert_names: list[str]
    holders: list[MoleHolder] = field(default_factory=list)
    fixed: dict[str, list[float]] | None = None
    source: str = ""

    def __repr__(self) -> str:
        kind = "fixed weights" if self.gate_file is None else f"{len(self.gate_file.scopes)} gate scopes"
        return f"MOLE_GATES[{self.source or 'gates'}: {kind}, experts {', '.join(self.expert_names)}]"

    def statistics(self) -> dict | None:
        """Recorded statistics ``{"mean": {scope: [N]}, "by_bucket": {b: {scope: [N]}}, ...}``:
        the live mixtures' last run if any, else the calibration stored in the gate file."""
        runs = [s for s in (h.summary() for h in self.holders) if s and s.get("samples")]
        if runs:
            return merge_summaries(runs)
        if self.gate_file is not None:
            return self.gate_file.info.get("calibration") or None
        return None


def merge_summaries(runs: list[dict]) -> dict:
    """Union of :meth:`mole_core.GateStats.summary` dicts of disjoint mixtures (UNet, text encoders).

    Timestep buckets come only from the UNet: text encoders run once per prompt, outside the
    sampler's timesteps.
    """
    out: dict = {"mean": {}, "by_bucket": {}, "buckets": [], "samples": 0, "entropy": {}}
    for run in runs:
        out["mean"].update(run["mean"])
        out["samples"] += int(run.get("samples", 0))
        components = {s.split(":", 1)[0] for s in run["mean"]}
        for comp in components:
            out["entropy"][comp] = run.get("entropy")
        if "unet" in components:
            for b, per_scope in run.get("by_bucket", {}).items():
                out["by_bucket"].setdefault(b, {}).update(per_scope)
            out["buckets"] = sorted({*out["buckets"], *run.get("buckets", [])})
            out["bucket_labels"] = {**out.get("bucket_labels", {}), **run.get("bucket_labels", {})}
    return out


def merge_gate_files(files: list[mole_core.GateFile]) -> mole_core.GateFile:
    """One in-memory gate file from snapshots of mixtures over disjoint components (UNet, CLIP)."""
    if len(files) == 1:
        return files[0]
    first = files[0]
    tensors: dict = {}
    scopes: dict = {}
    for f in files:
        tensors.update(f.tensors)
        scopes.update(f.scopes)
    info = {**first.info, "scopes": scopes, "version": max(f.info.get("version", 1) for f in files)}
    for f in files:  # gate_input "router": the router lives in the text encoders' mixture
        if "router" in f.info:
            info["router"] = f.info["router"]
    return mole_core.GateFile(first.path, first.config, first.experts, scopes, tensors, info)


def carry_over(snapshot: mole_core.GateFile, loaded: mole_core.GateFile) -> mole_core.GateFile:
    """The snapshot of a mixture built from ``loaded``, plus what the mixture did not use: gates of
    other components (text-encoder gates when no CLIP is connected), training record, metrics and
    saved statistics."""
    tensors, scopes = dict(snapshot.tensors), dict(snapshot.scopes)
    for scope, meta in loaded.scopes.items():
        if scope not in scopes:
            scopes[scope] = meta
            tensors.update({k: v for k, v in loaded.tensors.items() if k.startswith(f"gates.{scope}.")})
    info = {**snapshot.info, "scopes": scopes,  # the oldest reader of what it carries (per-set scales: 6)
            "version": max(snapshot.info.get("version", 1), loaded.info.get("version", 1))}
    if "router" in loaded.info and "router" not in info:  # no CLIP connected: keep the file's router
        info["router"] = loaded.info["router"]
        tensors.update({k: v for k, v in loaded.tensors.items() if k.startswith("router.")})
    for key in ("training", "metrics", "calibration"):
        if loaded.info.get(key):
            info[key] = loaded.info[key]
    return mole_core.GateFile(loaded.path, snapshot.config, snapshot.experts, scopes, tensors, info)
