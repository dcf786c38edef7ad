"""Per-expert block weights in the text format of Inspire-Pack's "LoRA Loader (Block Weight)".

That loader reads ``BASE,b1,b2,…``: the first value applies to everything outside the UNet's
``input_blocks`` / ``middle_block`` / ``output_blocks`` (text encoders included, times its CLIP
strength); then one value per *block number the LoRA touches*, in the order input blocks
(ascending), middle block, output blocks (ascending). An attention-only SD1.5 LoRA therefore has
17 values (BASE + input 1,2,4,5,7,8 + middle + output 3…11) and an SDXL one 12 (BASE + input
4,5,7,8 + middle + output 0…5). Vectors are computed per LoRA from the keys it really has, so
they line up with that loader for the same file. A line ``name:vector`` is accepted by its
``block_vector`` input as is.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .types import MoleExperts

_BLOCK = re.compile(r"^diffusion_model\.(input_blocks|middle_block|output_blocks)\.(\d+)\.")
_ORDER = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}


def block_of(model_key: str) -> tuple[int, int] | None:
    """``(section, number)`` of a ComfyUI UNet key, None for BASE keys (text encoders, time embedding…)."""
    m = _BLOCK.match(model_key)
    return (_ORDER[m[1]], int(m[2])) if m else None


def fmt(value: float) -> str:
    """Numbers as LBW users write them: ``1``, ``0``, ``0.25``."""
    v = round(float(value), 3)
    return str(int(v)) if v == int(v) else f"{v:g}"


def expert_vector(model_keys: dict[str, str], coef: Callable[[str], float | None]) -> list[float]:
    """``[BASE, block values…]`` of one expert; a block's value is the mean coefficient of the
    expert's targets in it. BASE is the mean over its merged non-block targets; when there are
    none (no such targets, or text-encoder parts that were not merged) it is the mean of the block
    values. ``coef`` returns None for targets that were not merged."""
    blocks: dict[tuple[int, int], list[float]] = {}
    base: list[float] = []
    for canon, key in model_keys.items():
        c = coef(canon)
        if c is None:
            continue
        b = block_of(key)
        (base if b is None else blocks.setdefault(b, [])).append(c)
    values = [sum(v) / len(v) for _, v in sorted(blocks.items())]
    pool = base or values
    return [sum(pool) / len(pool) if pool else 0.0, *values]


def lbw_text(experts: MoleExperts, coef: Callable[[int, str], float | None]) -> str:
    """One ``<expert name>:<BASE,b1,…>`` line per expert (use with model/clip strength 1)."""
    lines = []
    for i, entry in enumerate(experts.entries):
        vector = expert_vector(entry.model_keys, lambda canon, i=i: coef(i, canon))
        label = re.sub(r"[:\n]", "_", entry.name.rsplit("/", 1)[-1].removesuffix(".safetensors"))
        lines.append(f"{label}:{','.join(fmt(v) for v in vector)}")
    return "\n".join(lines)
