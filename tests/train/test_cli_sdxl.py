"""The CLI on an SDXL diffusers pipeline folder (issue #16): ``sample --weights`` equals diffusers ``set_adapters``
with both text encoders' LoRA parts at a non-square size, and ``train`` → ``sample --gates`` runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mole_core as mole
from tests.fixtures.oracle import diffusers_lora_pipeline
from train.cli import main

pytestmark = pytest.mark.slow


def _loras(paths) -> list[str]:  # noqa: ANN001
    return [a for p in paths for a in ("--lora", str(p))]


def _image(folder) -> tuple[np.ndarray, dict]:  # noqa: ANN001
    path = next(folder.glob("*.png"))
    return np.asarray(Image.open(path), dtype=np.int16), json.loads(Image.open(path).text["mole"])


def test_sdxl_sample_weights_equals_diffusers_set_adapters_non_square(tiny_sdxl_dir, sdxl_lora, tmp_path):
    paths = [e.path for e in sdxl_lora.experts]  # kohya (LDM names, lora_te1_/te2_) and diffusers files
    rc = main(["sample", "--base", str(tiny_sdxl_dir), *_loras(paths), "--weights", "0.5,0.75", "--prompt",
               "a photo of a cat", "--negative", "blurry", "--seed", "3", "--steps", "3", "--size", "64x96",
               "--cfg", "5", "--out", str(tmp_path)])
    assert rc == 0
    ours, info = _image(tmp_path)
    assert ours.shape == (96, 64, 3) and info["size"] == "64x96"
    pipe = diffusers_lora_pipeline(tiny_sdxl_dir, paths, [0.5, 0.75])
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5, height=96,
                  width=64, generator=torch.Generator().manual_seed(3)).images[0]
    theirs = np.asarray(theirs, dtype=np.int16)
    pipe.set_adapters(["expert0", "expert1"], [0.0, 0.0])  # the base model
    plain = np.asarray(pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5,
                            height=96, width=64, generator=torch.Generator().manual_seed(3)).images[0], dtype=np.int16)
    assert np.abs(ours - theirs).max() <= 1 < np.abs(theirs - plain).max()  # the LoRAs act, and act the same


def test_sdxl_train_then_sample_with_the_gates(tiny_sdxl_dir, sdxl_lora, refs_dir, tmp_path):
    paths = [e.path for e in sdxl_lora.experts]
    gates = tmp_path / "xl.safetensors"
    rc = main(["train", "--base", str(tiny_sdxl_dir), *_loras(paths), "--images", str(refs_dir), "--out", str(gates),
               "--steps", "3", "--resolution", "64", "--batch-size", "2", "--checkpoint-every", "0"])
    assert rc == 0
    gf = mole.read_gate_file(gates)
    assert gf.info["training"]["steps_done"] == 3 and any(s.startswith("unet:") for s in gf.scopes)
    out = tmp_path / "samples"
    rc = main(["sample", "--base", str(tiny_sdxl_dir), *_loras(paths), "--gates", str(gates), "--prompt", "a red ball",
               "--steps", "2", "--size", "96x64", "--out", str(out)])
    assert rc == 0
    image, info = _image(out)
    assert image.shape == (64, 96, 3) and info["mean_gates_by_bucket"]
