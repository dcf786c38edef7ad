"""``python write_checkpoint.py COMFYUI PATH FAMILY``: :func:`real_size.write_checkpoint` in a process of its own.

Building the SDXL file takes 14 GB; a process that frees them keeps most of them in its heap (thousands of tensors
under glibc's mmap threshold), which a test process would then hold beside the server that loads the file. A process
that exits gives them all back."""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    comfyui, path, family = argv
    sys.path[:0] = [str(Path(__file__).resolve().parents[3]), comfyui]  # this repo's `tests`, then ComfyUI's `comfy`
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    from tests.nodes.testing_pack.real_size import write_checkpoint

    write_checkpoint(path, family)


if __name__ == "__main__":
    main(sys.argv[1:])
