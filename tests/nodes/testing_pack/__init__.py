"""Test-only ComfyUI node pack: tiny SD1.5-topology MODEL/CLIP and a random CONDITIONING.

Placed in ``custom_nodes`` by ``tests/nodes/test_server.py`` next to the MoLE package; never shipped.
"""

from __future__ import annotations

from .tiny_comfy import tiny_clip, tiny_cond, tiny_model


class MoLETestTinyModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "weights seed"})}}

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load"
    CATEGORY = "MoLE/testing"

    def load(self, seed):
        return tiny_model(seed), tiny_clip(seed + 1)


class MoLETestTinyCond:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "context seed"})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "MoLE/testing"

    def make(self, seed):
        return (tiny_cond(seed),)


NODE_CLASS_MAPPINGS = {"MoLETestTinyModel": MoLETestTinyModel, "MoLETestTinyCond": MoLETestTinyCond}
