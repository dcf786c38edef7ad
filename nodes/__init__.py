"""ComfyUI V3 nodes of MoLE (category "MoLE").

Imported only through the repository's ``__init__.py`` (``from .nodes import MoleExtension``):
ComfyUI owns the top-level module name ``nodes``. Importing this package registers the
``models/mole_gates`` folder with ``folder_paths``.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .apply import MoleApply
from .bake import MoleBake
from .common import register_gate_folder
from .gates import MoleLoadGates, MoleSaveGates, MoleVisualizeGates
from .loaders import MoleLoadExperts

register_gate_folder()

NODES: list[type[io.ComfyNode]] = [MoleLoadExperts, MoleApply, MoleLoadGates, MoleSaveGates, MoleVisualizeGates,
                                   MoleBake]


class MoleExtension(ComfyExtension):
    """The MoLE node set (``MoLE_TrainGates`` is added by the training module when present)."""

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


__all__ = ["MoleExtension", "NODES"]
