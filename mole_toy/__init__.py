"""The toy world: a procedural shapes dataset, a tiny text-to-image model, concept LoRAs and probes.

Used by the quality benchmark (MoLE vs NLA on compositions of novel concepts) and ``make demo``.
Build the assets with ``python -m mole_toy build``; use them with :func:`load_world`.
"""

from __future__ import annotations

from .api import Composition, World, composition_prompts, load_world, reference_images, write_reference_folder
from .probes import Probe
from .world import ATTRIBUTES, BASE_VALUES, CONCEPTS, NOVEL, Concept, Spec, caption, render

__all__ = [
    "ATTRIBUTES", "BASE_VALUES", "CONCEPTS", "NOVEL", "Composition", "Concept", "Probe", "Spec", "World", "caption",
    "composition_prompts", "load_world", "reference_images", "render", "write_reference_folder",
]
