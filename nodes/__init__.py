"""ComfyUI V3 nodes of MoLE (category "MoLE").

Imported only through the repository's ``__init__.py`` (``from .nodes import MoleExtension``):
ComfyUI owns the top-level module name ``nodes``. Importing this package registers the
``models/mole_gates`` and ``models/mole_clip`` folders with ``folder_paths``; :func:`register_routes`
adds the ``/mole/…`` HTTP routes (called from ``comfy_entrypoint`` once the server exists).
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .apply import MoleApply
from .bake import MoleBake
from .common import register_gate_folder
from .gates import MoleLoadGates, MoleSaveGates, MoleVisualizeGates
from .loaders import MoleLoadExperts
from .routes import register_routes
from .train_node import MoleTrainGates, register_clip_folder

register_gate_folder()
register_clip_folder()

NODES: list[type[io.ComfyNode]] = [MoleLoadExperts, MoleApply, MoleLoadGates, MoleSaveGates, MoleVisualizeGates,
                                   MoleBake, MoleTrainGates]


class MoleExtension(ComfyExtension):
    """The MoLE node set."""

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


__all__ = ["MoleExtension", "NODES", "register_routes"]
