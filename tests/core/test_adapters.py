"""LyCORIS kinds in the engine beyond what ComfyUI can check (its cross-path test is in tests/nodes/test_cli_compat):
LoKr with a Tucker core against convolutions run one after another, and the one-line errors of GLoRA, OFT and
BOFT modules that do not fit."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import mole_core as mole

CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _conv1(unet) -> torch.nn.Conv2d:
    return unet.down_blocks[0].resnets[0].conv1


def _to_q(unet) -> torch.nn.Linear:
    return unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q


def _load(tmp_path, tensors: dict[str, torch.Tensor]) -> mole.Expert:
    path = tmp_path / "kind.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    with pytest.warns(mole.MoleWarning, match="exact dense delta"):
        return mole.load_expert(path)


def test_lokr_tucker_conv_equals_the_convolutions_run_in_turn(tiny_sd15, tmp_path):
    """``w1 ⊗ w2`` with ``w2`` a Tucker product (1×1 ``w2_b``, k×k core, 1×1 ``w2_a``): the engine's delta on a
    3×3 conv equals the Kronecker product of ``w1`` with the kernel that the three convolutions make together,
    read off by running them on unit impulses. (ComfyUI's own LoKr code fails on this form with this torch: it
    logs an error and leaves the layer unpatched.)"""
    conv = _conv1(tiny_sd15["unet"])
    o, i = conv.weight.shape[:2]
    g = torch.Generator().manual_seed(3)
    a, b, r = 2, 2, 3
    w1, w2a, w2b, t2 = (torch.randn(a, b, generator=g), torch.randn(r, o // a, generator=g),
                        torch.randn(r, i // b, generator=g), torch.randn(r, r, 3, 3, generator=g))
    e = _load(tmp_path, {f"{CONV}.lokr_w1": w1, f"{CONV}.lokr_w2_a": w2a, f"{CONV}.lokr_w2_b": w2b,
                         f"{CONV}.lokr_t2": t2, f"{CONV}.alpha": torch.tensor(1.5)})
    # the kernel of conv(1×1 w2_b) → conv(3×3 t2, core axes (a-side, b-side)) → conv(1×1 w2_aᵀ), from impulses
    impulses = torch.zeros(i // b, i // b, 5, 5)
    impulses[range(i // b), range(i // b), 2, 2] = 1
    h = torch.nn.functional.conv2d(impulses, w2b[:, :, None, None])
    h = torch.nn.functional.conv2d(h, t2)
    h = torch.nn.functional.conv2d(h, w2a.T[:, :, None, None])  # (in2, out2, 3, 3): a correlation, flipped
    w2 = h.flip(-1, -2).transpose(0, 1).contiguous()
    expected = torch.kron(w1[:, :, None, None], w2) * (1.5 / r)
    unet = copy.deepcopy(tiny_sd15["unet"])
    mix = mole.attach(unet, [e], mode="static", weights=[1.0])
    try:
        got = mix.merged_deltas()["unet:down_blocks.0.resnets.0.conv1"]
    finally:
        mix.detach()
    torch.testing.assert_close(got.reshape(expected.shape), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tensors, at, message", [
    (lambda o, i: {f"{LINEAR}.oft_blocks": torch.zeros(o // 4, 4, 4), f"{LINEAR}.dora_scale": torch.ones(o, 1)},
     "load", r"DoRA on OFT modules is not supported"),
    (lambda o, i: {f"{LINEAR}.oft_blocks": torch.zeros(2, o // 4, 4, 4)}, "load", r"BOFT module needs its alpha"),
    (lambda o, i: {f"{LINEAR}.oft_blocks": torch.zeros(2, o // 3, 3, 3), f"{LINEAR}.alpha": torch.tensor(1.0)},
     "load", r"BOFT blocks must be square and of even size"),
    (lambda o, i: {f"{LINEAR}.oft_blocks": torch.zeros(3, 4, 5)}, "load", r"OFT blocks must be square"),
    (lambda o, i: {f"{LINEAR}.a1.weight": torch.zeros(i, 2), f"{LINEAR}.a2.weight": torch.zeros(2, i),
                   f"{LINEAR}.b1.weight": torch.zeros(o, 2)}, "load", r"malformed GLoRA module .* missing b2"),
    (lambda o, i: {f"{LINEAR}.oft_blocks": torch.zeros(o // 4 + 1, 4, 4)}, "attach",
     r"OFT module does not fit the layer weight"),
    (lambda o, i: {f"{LINEAR}.a1.weight": torch.zeros(i + 1, 2), f"{LINEAR}.a2.weight": torch.zeros(2, i),
                   f"{LINEAR}.b1.weight": torch.zeros(o, 2), f"{LINEAR}.b2.weight": torch.zeros(2, i)}, "attach",
     r"GLoRA module does not fit the layer weight"),
])
def test_weight_dependent_modules_that_do_not_fit_are_one_line_errors(tiny_sd15, tmp_path, tensors, at, message):
    """Parts a kind cannot have are refused when the file is read; parts that do not fit the layer (only known
    against its weight) when the expert is attached — one line each, naming the module."""
    o, i = _to_q(tiny_sd15["unet"]).weight.shape
    path = tmp_path / "bad.safetensors"
    save_file(tensors(o, i), str(path))
    if at == "load":
        with pytest.raises(mole.MoleError, match=message) as info:
            mole.load_expert(path)
    else:
        with pytest.warns(mole.MoleWarning, match="exact dense delta"):
            e = mole.load_expert(path)
        with pytest.raises(mole.MoleError, match=message) as info:
            mole.attach(copy.deepcopy(tiny_sd15["unet"]), [e])
    assert "\n" not in str(info.value) and ("to_q" in str(info.value) or "to_q" in str(info.value).replace("_", "."))


def test_a_weight_dependent_module_with_a_non_finite_delta_is_refused_when_attached(tiny_sd15, tmp_path):
    o, i = _to_q(tiny_sd15["unet"]).weight.shape
    e = _load(tmp_path, {f"{LINEAR}.a1.weight": torch.full((i, 2), 900.0), f"{LINEAR}.a2.weight":
                         torch.full((2, i), 900.0), f"{LINEAR}.b1.weight": torch.zeros(o, 2),
                         f"{LINEAR}.b2.weight": torch.zeros(2, i)})
    unet = copy.deepcopy(tiny_sd15["unet"])
    _to_q(unet).weight.data.fill_(1e37)
    with pytest.raises(mole.MoleError, match="GLoRA module gives a non-finite delta") as info:
        mole.attach(unet, [e])
    assert "\n" not in str(info.value)
