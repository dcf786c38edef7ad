"""MoLE Save Gates / Load Gates / Visualize Gates.

Gate files live in ``models/mole_gates`` (registered with ``folder_paths``; ``extra_model_paths.yaml``
entries ``mole_gates:`` add folders), ``.safetensors`` only, in the engine's format — the same files
the CLI reads and writes. Saving adds the recorded gate statistics (``calibration``) to the metadata.
"""

from __future__ import annotations

import os
from typing import Any

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io, ui
from PIL import Image

import mole_core
from mole_core import viz
from mole_core.naming import execution_key
from mole_core.paths import path_inside

from .common import GATES_FOLDER, check_relative_name
from .types import GatesIO, MoleGates

_FOLDER_LABEL = "models/mole_gates"


# ----- helpers (pure functions of the payloads) -----
def gate_path_for_save(filename: str, what: str = "filename") -> tuple[str, str]:
    """``(relative name with .safetensors, absolute path)`` inside the first mole_gates folder; errors name the
    node input ``what``."""
    name = check_relative_name(filename, what, _FOLDER_LABEL)
    if not name.lower().endswith(".safetensors"):
        name += ".safetensors"
    return name, path_inside(folder_paths.get_folder_paths(GATES_FOLDER)[0], name, what, _FOLDER_LABEL)


def gate_path_for_load(name: str) -> str:
    """Absolute path of an existing gate file (checked name; ``.safetensors`` only)."""
    clean = check_relative_name(name, "gate_file", _FOLDER_LABEL)
    if not clean.lower().endswith(".safetensors"):
        raise mole_core.MoleError(f"`gate_file` {name!r}: gate files are .safetensors files")
    path = folder_paths.get_full_path(GATES_FOLDER, clean)
    if path is None:
        raise mole_core.MoleError(f"`gate_file` {name!r} not found in {_FOLDER_LABEL}")
    return path


def save_gates(gates: MoleGates, filename: str, overwrite: bool) -> str:
    """Write ``gates`` (plus their recorded statistics) as a gate file; returns the relative name."""
    if gates.gate_file is None:
        raise mole_core.MoleError(f"`gates` from {gates.source or 'a static MoLE'} are fixed weights with no gate "
                                  "tensors to save: use gated mode")
    name, path = gate_path_for_save(filename)
    if os.path.exists(path) and not overwrite:
        raise mole_core.MoleError(f"`filename`: {name} already exists in {_FOLDER_LABEL}; tick `overwrite` or "
                                  "choose another name")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    gf = gates.gate_file
    info = dict(gf.info)
    stats = gates.statistics()
    if stats:
        info["calibration"] = stats
    mole_core.write_gate_file(mole_core.GateFile(path, gf.config, gf.experts, gf.scopes, gf.tensors, info), path)
    return name


def load_gates(name: str) -> MoleGates:
    """Read a gate file of ``models/mole_gates`` (structure checked; experts are checked by MoLE Apply)."""
    gf = mole_core.read_gate_file(gate_path_for_load(name))
    return MoleGates(gf, [e.get("name", f"expert {i + 1}") for i, e in enumerate(gf.experts)],
                     source=f"gate file {name}")


def gate_table(gates: MoleGates, by_timestep: bool) -> dict:
    """Heatmap payload (experts × blocks [× timestep bucket]) of the best numbers available:
    recorded statistics, else fixed weights, else the gates' prior."""
    stats = gates.statistics()
    by_bucket, labels = None, {}
    if stats and stats.get("mean"):
        mean = stats["mean"]
        title = f"mean gate per expert and block ({stats.get('recorded', 'recorded while sampling')})"
        if by_timestep and len(stats.get("by_bucket", {})) > 0:
            by_bucket, labels = stats["by_bucket"], stats.get("bucket_labels", {})
    elif gates.fixed:
        mean, title = gates.fixed, "fixed weight per expert and block (uniform / static mode)"
    elif gates.gate_file is not None:
        mean, title = gates.gate_file.prior_gates(), "gate prior g(0) from the biases: no statistics recorded yet"
    else:
        raise mole_core.MoleError(f"`gates` from {gates.source or 'MoLE'} carry neither gates nor statistics")
    ordered = {s: mean[s] for s in sorted(mean, key=execution_key)}
    payload = viz.heatmap_payload(ordered, gates.expert_names, title=title, by_bucket=by_bucket)
    if by_bucket:
        payload["bucket_labels"] = {k: labels.get(k, f"bucket {k}") for k in by_bucket}
    payload["source"] = gates.source
    return payload


def render(payload: dict, scale: int) -> torch.Tensor:
    """The payload as an IMAGE tensor ``(1, H, W, 3)``: overall heatmap, then one per bucket."""
    images = [viz.render_heatmap(payload, scale=scale)]
    for key, values in (payload.get("buckets") or {}).items():
        sub = {**payload, "values": values,
               "title": f"{payload['bucket_labels'].get(key, key)} (timestep range)"}
        images.append(viz.render_heatmap(sub, scale=scale))
    width = max(im.width for im in images)
    canvas = Image.new("RGB", (width, sum(im.height for im in images)), "white")
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None]


# ----- nodes -----
class MoleSaveGates(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoLE_SaveGates", display_name="MoLE Save Gates", category="MoLE", is_experimental=True,
            is_output_node=True,
            description="Saves gates (and their recorded gate statistics) to models/mole_gates as .safetensors; "
                        "the CLI reads the same files.",
            inputs=[
                GatesIO.Input("gates", tooltip="Gates from MoLE Apply (gated mode), Visualize Gates or Load Gates."),
                io.String.Input("filename", default="mole_gates",
                                tooltip="File name inside models/mole_gates (sub-folders allowed, no '..'); "
                                        ".safetensors is added."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of that name (off: refuse and keep it)."),
            ],
            outputs=[io.String.Output(display_name="gate_file", tooltip="The saved file's name in models/mole_gates.")],
        )

    @classmethod
    def execute(cls, gates: MoleGates, filename: str, overwrite: bool) -> io.NodeOutput:
        name = save_gates(gates, filename, overwrite)
        return io.NodeOutput(name, ui=ui.PreviewText(f"saved {name} ({len(gates.expert_names)} experts)"))


class MoleLoadGates(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoLE_LoadGates", display_name="MoLE Load Gates", category="MoLE", is_experimental=True,
            description="Loads a gate file from models/mole_gates (written by MoLE Save Gates, training or the CLI). "
                        "MoLE Apply checks that it belongs to its experts.",
            inputs=[io.Combo.Input("gate_file", options=folder_paths.get_filename_list(GATES_FOLDER),
                                   tooltip="A .safetensors gate file in models/mole_gates.")],
            outputs=[GatesIO.Output(display_name="gates")],
        )

    @classmethod
    def validate_inputs(cls, gate_file: str) -> bool | str:
        try:
            gate_path_for_load(gate_file)
        except mole_core.MoleError as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, gate_file: str) -> Any:
        try:
            return os.path.getmtime(gate_path_for_load(gate_file))
        except (mole_core.MoleError, OSError):
            return float("nan")

    @classmethod
    def execute(cls, gate_file: str) -> io.NodeOutput:
        gates = load_gates(gate_file)
        gf = gates.gate_file
        text = (f"{gate_file}: {len(gf.experts)} experts ({', '.join(gates.expert_names)}), {len(gf.scopes)} "
                f"scopes, granularity {gf.config.granularity}")
        return io.NodeOutput(gates, ui=ui.PreviewText(text))


class MoleVisualizeGates(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MoLE_VisualizeGates", display_name="MoLE Visualize Gates", category="MoLE", is_experimental=True,
            is_output_node=True,
            description="Heatmap of which expert each UNet block uses: the mean gate of the last sampling run "
                        "(or the saved statistics, the fixed weights, or the gates' prior), optionally per timestep.",
            inputs=[
                GatesIO.Input("gates", tooltip="Gates from MoLE Apply (statistics of its last sampling run) or "
                                               "MoLE Load Gates."),
                io.Boolean.Input("by_timestep", default=False,
                                 tooltip="Also draw one heatmap per timestep range (noisy first)."),
                io.Int.Input("scale", default=2, min=1, max=6, tooltip="Pixel zoom of the heatmap image."),
                io.Latent.Input("samples", optional=True,
                                tooltip="Connect the sampler's output so this node runs after sampling."),
            ],
            outputs=[io.Image.Output(display_name="image"),
                     io.String.Output(display_name="csv", tooltip="The numbers: one row per block, one column "
                                                                 "per expert."),
                     io.String.Output(display_name="json", tooltip="The heatmap payload as JSON."),
                     GatesIO.Output(display_name="gates", tooltip="The input gates, passed on after this node.")],
        )

    @classmethod
    def execute(cls, gates: MoleGates, by_timestep: bool, scale: int, samples: Any = None) -> io.NodeOutput:
        payload = gate_table(gates, by_timestep)
        image = render(payload, scale)
        preview = ui.PreviewImage(image, cls=cls).as_dict()
        return io.NodeOutput(image, viz.payload_csv(payload), viz.payload_json(payload), gates,
                             ui={**preview, "mole_gates": [payload]})
