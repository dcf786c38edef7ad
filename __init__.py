"""ComfyUI entry point of MoLE (Mixture of LoRA Experts).

Light on import: nodes, routes and heavy libraries load only when ComfyUI awaits
``comfy_entrypoint``. Our ``nodes`` package is imported relatively (ComfyUI owns the
top-level name ``nodes``); ``mole_core`` is registered once as a top-level package so the
engine has a single identity whether it is imported by ComfyUI, the CLI or tests.
"""

from __future__ import annotations

import importlib.util
import os
import sys

WEB_DIRECTORY = "./web/js"
_HERE = os.path.dirname(os.path.abspath(__file__))


def _register_mole_core() -> None:
    if "mole_core" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "mole_core", os.path.join(_HERE, "mole_core", "__init__.py"),
        submodule_search_locations=[os.path.join(_HERE, "mole_core")])
    if spec is None or spec.loader is None:
        raise ImportError("MoLE: cannot locate mole_core next to this file")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mole_core"] = module
    spec.loader.exec_module(module)


async def comfy_entrypoint():
    """Called by ComfyUI (V3 node API): registers the ``/mole/…`` routes and returns the MoLE extension."""
    _register_mole_core()
    from .nodes import MoleExtension, register_routes

    register_routes()
    return MoleExtension()
