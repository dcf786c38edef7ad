"""``train.sampling.attach_merged``: a fixed mixture merged into the weights gives diffusers/PEFT's outputs for the
same adapter weights, and detaching puts the bare model back bit for bit."""

from __future__ import annotations

import copy

import torch

import mole_core as mole
from tests.fixtures.oracle import diffusers_static_mixture, unet_inputs
from train.sampling import attach_merged


def test_merged_static_mixture_is_peft_set_adapters_and_detach_restores_bit_exactly(tiny_sd15, lora_set):
    model = {"unet": copy.deepcopy(tiny_sd15["unet"]), "te": copy.deepcopy(tiny_sd15["text_encoder"])}
    inputs = unet_inputs(model["unet"], batch=2, seed=3)
    ids = torch.arange(2 * 8).reshape(2, 8) % 100
    with torch.no_grad():
        bare = model["unet"](**inputs).sample, model["te"](ids)[0]
    weights = [0.6, 1.0, 0.3]
    mixes = attach_merged(model, mole.load_experts(lora_set.paths), mode="static", weights=weights)
    assert not any(m._forward_hooks for part in model.values() for m in part.modules())  # merged: no hooks left
    with torch.no_grad():
        merged = model["unet"](**inputs).sample, model["te"](ids)[0]
    for m in mixes:
        m.detach()
    with torch.no_grad():
        restored = model["unet"](**inputs).sample, model["te"](ids)[0]
    peft_unet, peft_te = diffusers_static_mixture(tiny_sd15, lora_set.paths, weights)
    with torch.no_grad():
        want = peft_unet(**unet_inputs(peft_unet, batch=2, seed=3)).sample, peft_te(ids)[0]
    assert min((m - b).abs().max() for m, b in zip(merged, bare)) > 1e-3  # the LoRAs change UNet and text encoder
    for got, ref in zip(merged, want):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(r, b) for r, b in zip(restored, bare))

