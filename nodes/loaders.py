"""MoLE Load Experts: pick LoRAs from ``models/loras`` as experts (chainable, up to 8 in all)."""

from __future__ import annotations

from typing import Any

import folder_paths
from comfy_api.latest import io, ui

import mole_core
from mole_core.checks import check_number

from .comfy_experts import build_key_map, load_entry, lora_path
from .comfy_index import family_of
from .types import MAX_EXPERTS, ExpertsIO, MoleExperts

SLOTS = 4
NONE = "None"


def load_experts(model: Any, clip: Any, picks: list[tuple[str, float, bool]],
                 previous: MoleExperts | None = None) -> MoleExperts:
    """Append the picked LoRAs (``(file name, strength, on)``) to ``previous`` as experts.

    Raises:
        MoleError: no LoRA picked, more than 8 experts, a file that matches 0 layers of ``model``.
    """
    before = list(previous.entries) if previous is not None else []
    if not picks and not before:
        raise mole_core.MoleError("pick at least one LoRA (lora_1 … lora_4) or connect `experts`")
    if len(before) + len(picks) > MAX_EXPERTS:
        raise mole_core.MoleError(f"MoLE mixes at most {MAX_EXPERTS} experts, got {len(before) + len(picks)}")
    key_map = build_key_map(model, clip)
    family = type(model.model.model_config).__name__
    entries = [load_entry(model, clip, key_map, name, lora_path(name), s, on, family) for name, s, on in picks]
    return MoleExperts(before + entries, family=family_of(model),
                       with_clip=clip is not None or bool(previous and previous.with_clip))


class MoleLoadExperts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        loras = [NONE, *folder_paths.get_filename_list("loras")]
        slots = []
        for i in range(1, SLOTS + 1):
            slots += [
                io.Combo.Input(f"lora_{i}", options=loras, default=NONE,
                               tooltip=f"LoRA file for expert {i} (from models/loras); None leaves the slot empty."),
                io.Float.Input(f"strength_{i}", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip=f"Strength of expert {i} (scales its LoRA like LoraLoader's strength)."),
                io.Boolean.Input(f"on_{i}", default=True,
                                 tooltip=f"Expert {i} on or off. An expert that is off keeps its place in the "
                                         "gate order; MoLE Apply renormalises the others."),
            ]
        return io.Schema(
            node_id="MoLE_LoadExperts", display_name="MoLE Load Experts", category="MoLE", is_experimental=True,
            description="Loads 1 to 4 LoRAs as MoLE experts (chain nodes through `experts` for up to 8). Layers "
                        "are found with ComfyUI's own LoRA key maps; the node reports how many each LoRA matched.",
            inputs=[
                io.Model.Input("model", tooltip="The model the LoRAs are for: its layer names decide which layers "
                                                "each LoRA reaches."),
                *slots,
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional CLIP: also load the LoRAs' text-encoder parts."),
                ExpertsIO.Input("experts", optional=True,
                                tooltip="Experts from another MoLE Load Experts; this node's LoRAs come after them."),
            ],
            outputs=[ExpertsIO.Output(display_name="experts", tooltip="The experts, in gate order.")],
        )

    @classmethod
    def execute(cls, model: Any, clip: Any = None, experts: MoleExperts | None = None,
                **slots: Any) -> io.NodeOutput:
        picks = [(slots[f"lora_{i}"], check_number(slots.get(f"strength_{i}", 1.0), f"`strength_{i}`", lo=-10, hi=10),
                  bool(slots.get(f"on_{i}", True)))
                 for i in range(1, SLOTS + 1) if slots.get(f"lora_{i}", NONE) not in (NONE, "", None)]
        out = load_experts(model, clip, picks, experts)
        report = "\n".join(e.report for e in out.entries)
        return io.NodeOutput(out, ui=ui.PreviewText(report))
