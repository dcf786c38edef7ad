"""The engine against independent oracles: diffusers/PEFT ``set_adapters``, hand-merged weights,
ComfyUI's own adapters. Tiny SD1.5/SDXL-topology diffusers models from tests/fixtures."""

from __future__ import annotations

import copy

import pytest
import torch

import mole_core as mole
from mole_core.naming import canonical_from_prefix
from tests.fixtures import lora_writers as lw
from tests.fixtures.comfy_check import comfy_deltas, find_comfyui_root
from tests.fixtures.ldm_names import to_ldm
from tests.fixtures.oracle import (
    diffusers_lora_pipeline,
    diffusers_static_mixture,
    hand_merged,
    prompt_ids,
    text_encoder_forward,
    unet_forward,
    unet_inputs,
)

TOL = 1e-5


def _copy(components: dict) -> dict:
    return {k: v if k.startswith("tokenizer") else copy.deepcopy(v) for k, v in components.items()}


def _ours(components: dict, paths: list, **kw):
    comps = _copy(components)
    experts = mole.load_experts(paths)
    mix = mole.attach({"unet": comps["unet"], "te": comps["text_encoder"], "te2": comps.get("text_encoder_2")},
                      experts, **kw)
    return comps, mix


@pytest.mark.parametrize("weights", [[0.5, 1.0, 0.25], [1.0, 1.0, 1.0], [0.3, -0.7, 1.2]])
def test_static_equals_diffusers_set_adapters(tiny_sd15, lora_set, weights):
    """3 experts (ranks 4/8/16; kohya with a 1×1 and a 3×3 conv LoRA, PEFT folder, diffusers file)."""
    ref_unet, ref_te = diffusers_static_mixture(tiny_sd15, lora_set.paths, weights)
    comps, mix = _ours(tiny_sd15, lora_set.paths, mode="static", weights=weights)
    assert {e.format for e in mix.experts} == {"kohya", "peft", "diffusers"}
    assert any(b.is_conv and b.kernel == (3, 3) for b in mix.banks.values())
    got, want = unet_forward(comps["unet"]), unet_forward(ref_unet)
    assert (got - want).abs().max() <= TOL
    ids = prompt_ids(tiny_sd15["tokenizer"])
    got_t, want_t = text_encoder_forward(comps["text_encoder"], ids), text_encoder_forward(ref_te, ids)
    assert (got_t - want_t).abs().max() <= TOL
    assert (want - unet_forward(tiny_sd15["unet"])).abs().max() > 1e-3  # the LoRAs do change the output
    mix.detach()


def test_single_expert_equals_weight_merge(tiny_sd15, lora_set):
    e = lora_set[0]
    s = 0.7
    comps, mix = _ours(tiny_sd15, [f"{e.path}:{s}"])
    merged_unet = hand_merged(tiny_sd15["unet"], [(e.unet.state_dict, s * e.scale)])
    merged_te = hand_merged(tiny_sd15["text_encoder"], [(e.te.state_dict, s * e.scale)])
    assert (unet_forward(comps["unet"]) - unet_forward(merged_unet)).abs().max() <= TOL
    ids = prompt_ids(tiny_sd15["tokenizer"])
    assert (text_encoder_forward(comps["text_encoder"], ids) - text_encoder_forward(merged_te, ids)).abs().max() <= TOL
    # every target: the bank's merged delta equals s·ΔW of the file
    deltas = mix.merged_deltas()
    for module in lw.lora_modules(e.unet.state_dict):
        name = f"unet:{module}"
        torch.testing.assert_close(deltas[name], lw.peft_delta(e.unet.state_dict, module, s * e.scale)
                                   .reshape(deltas[name].shape), atol=1e-6, rtol=1e-5)
    mix.detach()


def test_same_lora_in_all_formats_gives_identical_experts(same_lora_all_formats):
    experts = {fmt: mole.load_expert(p) for fmt, p in same_lora_all_formats.paths.items()}
    ref = experts["kohya"]
    assert {e.format for e in experts.values()} == {"kohya", "diffusers", "peft", "comfyui"}
    for fmt, e in experts.items():
        assert set(e.factors) == set(ref.factors), fmt
        for k, f in e.factors.items():
            r = ref.factors[k]
            assert f.scale == pytest.approx(r.scale), (fmt, k)
            torch.testing.assert_close(f.delta(), r.delta(), atol=1e-6, rtol=1e-5, msg=f"{fmt} {k}")


def test_gated_runs_at_two_resolutions_with_one_gate_file(tiny_sd15, lora_set, tmp_path):
    comps, mix = _ours(tiny_sd15, lora_set.paths, gate_config=mole.GateConfig(granularity="block"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in mix.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    path = mole.save_gates(mix, tmp_path / "g.safetensors")
    mix.detach()
    comps2 = _copy(tiny_sd15)
    mix2 = mole.attach({"unet": comps2["unet"], "te": comps2["text_encoder"]}, mole.load_experts(lora_set.paths),
                       gates=path)
    unet = comps2["unet"]
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        for h, w in ((16, 16), (24, 32)):
            x = torch.randn(2, 4, h, w, generator=g)
            out = unet(x, torch.tensor([10, 700]), encoder_hidden_states=ctx).sample
            assert out.shape == (2, 4, h, w) and torch.isfinite(out).all()
            unet_gates = [v for k, v in mix2.live_gates.items() if k.startswith("unet:")]
            assert unet_gates and all(v.shape == (2, 3) for v in unet_gates)
            assert any((v[0] - v[1]).abs().max() > 1e-4 for v in unet_gates)  # CFG-style batch: per sample
    mix2.detach()


def test_bake_and_exported_lora_reproduce_static_mixture(tiny_sd15, lora_set, tmp_path):
    weights = [0.6, 0.3, 0.8]
    comps, mix = _ours(tiny_sd15, lora_set.paths, mode="static", weights=weights)
    static = unet_forward(comps["unet"])
    ids = prompt_ids(tiny_sd15["tokenizer"])
    static_te = text_encoder_forward(comps["text_encoder"], ids)
    for fmt in ("kohya", "diffusers"):
        path = mole.export_lora(mix, tmp_path / f"mix_{fmt}.safetensors", fmt=fmt)
        pipe = diffusers_lora_pipeline(tiny_sd15, [path], [1.0])
        assert (unet_forward(pipe.unet) - static).abs().max() <= TOL, fmt
        assert (text_encoder_forward(pipe.text_encoder, ids) - static_te).abs().max() <= TOL, fmt
    baked = mole.bake_into_model(mix)
    assert (unet_forward(comps["unet"]) - static).abs().max() <= TOL
    assert (text_encoder_forward(comps["text_encoder"], ids) - static_te).abs().max() <= TOL
    baked.restore()
    assert torch.equal(unet_forward(comps["unet"]), unet_forward(tiny_sd15["unet"]))


@pytest.mark.parametrize("which", [0, 1])
def test_sdxl_static_equals_diffusers(tiny_sdxl, sdxl_lora, which):
    """kohya SDXL file (LDM names, lora_te1_/lora_te2_) and its diffusers twin on both text encoders."""
    path = sdxl_lora[which].path
    pipe = diffusers_lora_pipeline(tiny_sdxl, [path], [0.8])
    comps, mix = _ours(tiny_sdxl, [path], mode="static", weights=[0.8])
    assert mix.index.family == "sdxl" and {t.split(":")[0] for t in mix.banks} == {"unet", "te", "te2"}
    inputs = unet_inputs(comps["unet"])
    with torch.no_grad():
        got = comps["unet"](**inputs).sample
        want = pipe.unet(**inputs).sample
    assert (got - want).abs().max() <= TOL
    ids = prompt_ids(tiny_sdxl["tokenizer"])
    for ours, theirs in ((comps["text_encoder"], pipe.text_encoder), (comps["text_encoder_2"], pipe.text_encoder_2)):
        assert (text_encoder_forward(ours, ids) - text_encoder_forward(theirs, ids)).abs().max() <= TOL
    mix.detach()


def test_bad_lora_files_give_one_line_errors(tiny_sd15, tmp_path):
    unet = copy.deepcopy(tiny_sd15["unet"])
    wrong = mole.load_expert(lw.write_wrong_shape_lora(tmp_path / "wrong.safetensors"))
    with pytest.raises(mole.MoleError, match=r"unet:.*LoRA is 48→\d+ but the model layer is 32→\d+"):
        mole.attach(unet, [wrong])
    with pytest.raises(mole.MoleError, match=r"flux.safetensors: 0 of \d+ LoRA modules map .* another model family"):
        mole.load_expert(lw.write_other_arch_lora(tmp_path / "flux.safetensors"))
    nan = mole.load_expert(lw.write_nan_lora(tmp_path / "nan.safetensors"))
    with pytest.raises(mole.MoleError, match="'nan.safetensors'.*NaN"):
        mole.attach(unet, [nan])
    for writer, pattern in ((lw.write_not_safetensors, "not a safetensors"), (lw.write_truncated, "truncated"),
                            (lw.write_no_lora_keys, "no LoRA keys")):
        with pytest.raises(mole.MoleError, match=pattern):
            mole.load_expert(writer(tmp_path / f"{writer.__name__}.safetensors"))
    assert not any(m._forward_hooks for m in unet.modules())


def test_loha_lokr_dense_fallback_is_exact(tiny_sd15, tmp_path):
    loha = lw.write_loha(tmp_path / "loha.safetensors")
    lokr = lw.write_lokr(tmp_path / "lokr.safetensors")
    with pytest.warns(mole.MoleWarning, match="dense delta"):
        experts = [mole.load_expert(loha), mole.load_expert(lokr)]
    from safetensors.torch import load_file

    for e, path, delta_fn in ((experts[0], loha, lw.loha_delta), (experts[1], lokr, lw.lokr_delta)):
        sd = load_file(path)
        prefixes = sorted({k.rsplit(".", 1)[0] for k in sd if not k.endswith(".alpha")})
        for prefix in prefixes:
            name = canonical_from_prefix(prefix)
            torch.testing.assert_close(e.factors[name].delta(), delta_fn(sd, prefix).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(find_comfyui_root() is None, reason="no ComfyUI checkout (set COMFYUI_PATH or use ~/ComfyUI)")
def test_comfy_key_maps_give_the_same_experts(same_lora_all_formats, tiny_sd15):
    """ComfyUI's own adapters (file read with its key conventions) compute the same deltas as our experts."""
    root = find_comfyui_root()
    path = same_lora_all_formats.paths["comfy"]
    e = mole.load_expert(path)
    unet = tiny_sd15["unet"]
    mods = dict(unet.named_modules())
    entries = []
    for name in e.factors:
        comp, module = name.split(":", 1)
        if comp != "unet":
            continue
        entries.append((f"diffusion_model.{to_ldm(module)}", tuple(mods[module].weight.shape)))
    (comfy,) = comfy_deltas(root, [(path, entries)])
    assert len(comfy) == len(entries) > 0
    for prefix, _ in entries:
        name = canonical_from_prefix(prefix)
        torch.testing.assert_close(e.factors[name].delta().reshape(comfy[prefix].shape), comfy[prefix],
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("axis", ["output", "input"])
def test_dora_expert_is_the_weight_decomposition_by_hand(tiny_sd15, tmp_path, axis):
    """A kohya / LyCORIS DoRA module (``dora_scale``) acts as ``W + s·(W' − W)`` with ``W' = m · (W + ΔW) / n``:
    ``n`` is the norm of each output row of ``W`` for an output-axis magnitude (ComfyUI's convention), of each
    input column of ``W + ΔW`` for an input-axis one; computed here by hand on the layer's real weight."""
    from safetensors.torch import save_file

    module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    weight = dict(tiny_sd15["unet"].named_modules())[module].weight.detach().float()
    gen = torch.Generator().manual_seed(3)
    down = torch.randn(2, weight.shape[1], generator=gen) * 0.3
    up = torch.randn(weight.shape[0], 2, generator=gen) * 0.3
    delta = up @ down * (1.0 / 2)  # alpha 1, rank 2
    eps = torch.finfo(torch.float32).eps
    if axis == "output":
        m = weight.norm(dim=1, keepdim=True) * 1.2  # (out, 1)
        decomposed = m * (weight + delta) / (weight.norm(dim=1, keepdim=True) + eps)
    else:
        m = (weight + delta).norm(dim=0, keepdim=True) * 0.8  # (1, in)
        decomposed = m * (weight + delta) / ((weight + delta).norm(dim=0, keepdim=True) + eps)
    key = "lora_unet_" + module.replace(".", "_")
    path = tmp_path / "dora.safetensors"
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0),
               f"{key}.dora_scale": m}, str(path))
    s = 0.7
    with pytest.warns(mole.MoleWarning, match="DoRA"):
        comps, mix = _ours(tiny_sd15, [f"{path}:{s}"])
    merged = copy.deepcopy(tiny_sd15["unet"])
    with torch.no_grad():
        dict(merged.named_modules())[module].weight += s * (decomposed - weight)
    try:
        assert (unet_forward(comps["unet"]) - unet_forward(merged)).abs().max() <= TOL
        assert (unet_forward(comps["unet"]) - unet_forward(tiny_sd15["unet"])).abs().max() > 100 * TOL
        torch.testing.assert_close(mix.merged_deltas()[f"unet:{module}"], s * (decomposed - weight), atol=1e-6,
                                   rtol=1e-5)
    finally:
        mix.detach()


def test_dora_magnitude_that_fits_no_axis_is_a_one_line_error(tiny_sd15, tmp_path):
    from safetensors.torch import save_file

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    weight = tiny_sd15["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    save_file({f"{key}.lora_down.weight": torch.ones(2, weight.shape[1]), f"{key}.lora_up.weight":
               torch.ones(weight.shape[0], 2), f"{key}.dora_scale": torch.ones(3, 5)}, str(tmp_path / "d.safetensors"))
    with pytest.warns(mole.MoleWarning, match="DoRA"):
        e = mole.load_expert(tmp_path / "d.safetensors")
    with pytest.raises(mole.MoleError, match=r"DoRA magnitude \(3, 5\) fits neither axis") as info:
        mole.attach(copy.deepcopy(tiny_sd15["unet"]), [e])
    assert "\n" not in str(info.value)
