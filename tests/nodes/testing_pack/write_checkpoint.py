"""``python write_checkpoint.py COMFYUI PATH FAMILY``: :func:`real_size.write_checkpoint` in a process of its own.

Building the SDXL file takes 14 GB; a process that frees them keeps most of them in its heap (thousands of tensors
under glibc's mmap threshold), which a test process would then hold beside the server that loads the file. A process
that exits gives them all back.

Only ComfyUI's root goes on ``sys.path``: this test pack is loaded by its file path, so ComfyUI's own ``nodes`` and
``tests`` cannot be shadowed by this repository's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    comfyui, path, family = argv
    sys.path.insert(0, comfyui)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    pack = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("mole_testing_pack", pack / "__init__.py",
                                                  submodule_search_locations=[str(pack)])
    sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from mole_testing_pack.real_size import write_checkpoint

    write_checkpoint(path, family)


if __name__ == "__main__":
    main(sys.argv[1:])
