"""MoLE engine: Mixture of LoRA Experts for any torch model (pure torch + safetensors).

Typical use with a diffusers pipeline::

    import mole_core as mole
    experts = mole.load_experts(["a.safetensors", "b.safetensors:0.8", "c_peft_folder"])
    mix = mole.attach(pipe, experts, gates="gates.safetensors")   # or mole.GateConfig(...)
    image = pipe("a photo of ...").images[0]
    mix.set_mode("uniform"); mix.set_mask([1, 0, 1]); mix.detach()

This package never imports ComfyUI or diffusers.
"""

from __future__ import annotations

from .attaching import attach
from .bake import BakedWeights, bake_into_model, export_lora
from .bank import ExpertBank
from .errors import MoleError, MoleWarning
from .expert import Expert, LoraFactor
from .gate_file import GateFile, apply_gate_file, load_gates, read_gate_file, save_gates, snapshot, write_gate_file
from .gates import GateConfig, balance_loss, entropy
from .lora_files import load_expert, load_experts, parse_lora_spec, peft_scale
from .methods import METHODS, average_blocks, composite_rows, repeat_blocks, switch_expert, switch_rows
from .mixture import Mixture
from .model_index import ModelIndex, index_model
from .naming import block_label, canonical_from_prefix, scope_of
from .routes import RouteTable
from .stats import GateStats
from .triggers import calibrate_triggers, trigger_words

__all__ = [
    "METHODS", "BakedWeights", "Expert", "ExpertBank", "GateConfig", "GateFile", "GateStats", "LoraFactor", "Mixture",
    "ModelIndex", "MoleError", "MoleWarning",
    "RouteTable", "apply_gate_file", "attach", "average_blocks", "bake_into_model",
    "balance_loss", "block_label", "calibrate_triggers",
    "canonical_from_prefix", "composite_rows", "entropy", "export_lora", "index_model",
    "load_expert", "load_experts", "load_gates", "parse_lora_spec", "peft_scale", "read_gate_file", "repeat_blocks",
    "save_gates", "scope_of", "snapshot", "switch_expert", "switch_rows", "trigger_words", "write_gate_file",
]
__version__ = "0.1.0"
