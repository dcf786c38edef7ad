"""Test-only ComfyUI node pack: tiny SD1.5-, SDXL- and SD2.x-v-topology MODEL/CLIP/VAE, a random CONDITIONING and
reference images.

Placed in ``custom_nodes`` by ``tests/nodes/test_server.py`` next to the MoLE package; never shipped.
"""

from __future__ import annotations

from .tiny_comfy import (
    blob_images,
    tiny_clip,
    tiny_cond,
    tiny_model,
    tiny_sd2_clip,
    tiny_sd2_model,
    tiny_sdxl_clip,
    tiny_sdxl_model,
    tiny_vae,
)


class MoLETestTinyModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "weights seed"})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "MoLE/testing"

    def load(self, seed):
        return tiny_model(seed), tiny_clip(seed + 1), tiny_vae(seed + 2)


class MoLETestTinySDXL(MoLETestTinyModel):
    def load(self, seed):
        return tiny_sdxl_model(seed), tiny_sdxl_clip(seed + 1), tiny_vae(seed + 2)


class MoLETestTinySD2(MoLETestTinyModel):
    def load(self, seed):
        return tiny_sd2_model(seed), tiny_sd2_clip(seed + 1), tiny_vae(seed + 2)


class MoLETestTinyCond:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "context seed"})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "MoLE/testing"

    def make(self, seed):
        return (tiny_cond(seed),)


class MoLETestBlobs:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "count": ("INT", {"default": 4, "min": 0, "max": 64, "tooltip": "number of images (0: an empty batch)"}),
            "size": ("INT", {"default": 64, "min": 8, "max": 512, "tooltip": "pixel size"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "colours and places"})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "MoLE/testing"

    def make(self, count, size, seed):
        return (blob_images(count, size, seed),)


NODE_CLASS_MAPPINGS = {"MoLETestTinyModel": MoLETestTinyModel, "MoLETestTinySDXL": MoLETestTinySDXL,
                       "MoLETestTinySD2": MoLETestTinySD2,
                       "MoLETestTinyCond": MoLETestTinyCond, "MoLETestBlobs": MoLETestBlobs}
