"""MoLE Load Experts + MoLE Apply against core ComfyUI (LoraLoader as the oracle), in-process, CPU."""

from __future__ import annotations

import pytest
import torch

from tests.nodes import _loras
from tests.nodes._helpers import encode, lora_loader, sample, unload_all
from tests.nodes._nodes import apply, constant_gates, constant_sigmoid_gates, load, random_gates, rel

pytestmark = pytest.mark.comfy


def test_load_experts_reports_matches_and_canonical_names(experts, files):
    import mole_core

    assert [e.name for e in experts.entries] == ["a.safetensors", "b.safetensors"]
    entry = experts.entries[0]
    assert "194 UNet" in entry.report and "12 text encoder" in entry.report and "unused" not in entry.report
    # ComfyUI's key maps and the engine's own parser agree on every canonical name
    own = mole_core.load_expert(files["a"])
    assert set(entry.expert.factors) == set(own.factors) == set(files["lora_a"].factors)
    assert entry.sha256 == own.sha256
    assert entry.model_keys["unet:down_blocks.0.attentions.0.proj_in"] == \
        "diffusion_model.input_blocks.1.1.proj_in.weight"
    assert entry.model_keys["te:text_model.encoder.layers.1.mlp.fc2"] == \
        "clip_l.transformer.text_model.encoder.layers.1.mlp.fc2.weight"


def test_static_weights_equal_chained_lora_loaders_and_clip_strength(mole, tiny, experts, files, base_out):
    model, clip = tiny
    m, c, _ = apply(mole, model, experts, "static weights", "0.7, 0.4", clip=clip)
    ref_m, ref_c = lora_loader(model, clip, files["a"], 0.7)
    ref_m, ref_c = lora_loader(ref_m, ref_c, files["b"], 0.4)
    with torch.inference_mode():
        ours, oracle = sample(m), sample(ref_m)
        assert (ours - oracle).abs().max() <= 1e-4
        assert (ours - base_out).abs().max() > 1.0  # the experts really act
        cond, cond_ref, cond_base = encode(c), encode(ref_c), encode(clip)
    assert torch.equal(cond, cond_ref)
    assert (cond - cond_base).abs().max() > 1e-3


def test_one_expert_equals_lora_loader_and_expert_strength(mole, tiny, files):
    model, clip = tiny
    single = load(mole, model, None, ("b.safetensors", 0.6, True))
    m, _, _ = apply(mole, model, single, "uniform (NLA)")
    ref_m, _ = lora_loader(model, None, files["b"], 0.6)
    with torch.inference_mode():
        assert (sample(m) - sample(ref_m)).abs().max() <= 1e-4


def test_kohya_comfy_and_peft_files_give_the_same_result(mole, tiny, comfy_dirs):
    model, clip = tiny
    lora = _loras.random_lora(model, clip, seed=5, rank=4, alpha=4.0)  # alpha = rank: PEFT files store none
    _loras.write_kohya(lora, comfy_dirs["loras"] / "f_kohya.safetensors")
    _loras.write_comfy(lora, model, comfy_dirs["loras"] / "f_comfy.safetensors")
    _loras.write_peft(lora, comfy_dirs["loras"] / "f_peft.safetensors")
    _loras.write_peft(lora, comfy_dirs["loras"] / "f_diffusers.safetensors", unet_prefix="unet.")
    outs, conds = {}, {}
    for fmt in ("kohya", "comfy", "peft", "diffusers"):
        ex = load(mole, model, clip, (f"f_{fmt}.safetensors", 1.0, True))
        assert len(ex.entries[0].model_keys) == len(lora.factors), ex.entries[0].report
        m, c, _ = apply(mole, model, ex, "uniform (NLA)", clip=clip)
        with torch.inference_mode():
            outs[fmt], conds[fmt] = sample(m, steps=1), encode(c)
    for fmt in ("comfy", "peft", "diffusers"):
        assert torch.equal(outs[fmt], outs["kohya"]), fmt
        assert torch.equal(conds[fmt], conds["kohya"]), fmt
    ref_m, _ = lora_loader(model, None, comfy_dirs["loras"] / "f_kohya.safetensors", 1.0)
    with torch.inference_mode():
        assert (sample(ref_m, steps=1) - outs["kohya"]).abs().max() <= 1e-4


def test_original_model_is_bit_exact_after_mole_clones(mole, tiny, experts, base_out):
    model, _ = tiny
    static, _, _ = apply(mole, model, experts, "static weights", "1, 1")
    gated, _, _ = apply(mole, model, experts, "gated")
    with torch.inference_mode():
        for mole_model in (static, gated):
            sample(mole_model)
            assert torch.equal(sample(model), base_out)
    unet = model.model.diffusion_model
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())


def _forward(mp, budget: int, x, sigma, ctx):
    """One ``apply_model`` with ``mp`` patched in fully (budget 0) or in lowvram mode."""
    unload_all()
    mp.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=budget)
    try:
        assert mp.model.model_lowvram == (budget > 0)
        return mp.model.apply_model(x, sigma, c_crossattn=ctx)
    finally:
        mp.unpatch_model(device_to=torch.device("cpu"))


def test_lowvram_partial_load_equals_full_load(mole, tiny, experts):
    model, _ = tiny
    gen = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 32, generator=gen)
    sigma = torch.tensor([3.0, 3.0])
    for mode, weights in (("static weights", "0.5, 0.8"), ("gated", "")):
        m, _, _ = apply(mole, model, experts, mode, weights)
        with torch.inference_mode():
            full = _forward(m, 0, x, sigma, ctx)
            low = _forward(m, 2 * 1024 * 1024, x, sigma, ctx)
            bare = _forward(model, 0, x, sigma, ctx)
        assert rel(low, full) <= 1e-5, mode
        assert rel(full, bare) > 1e-3, mode


def test_gated_cfg_batches_get_per_sample_gates(mole, tiny, experts, comfy_dirs):
    model, _ = tiny
    gates = random_gates(mole, model, experts, comfy_dirs["mole_gates"], "per_sample.safetensors")
    m, _, g = apply(mole, model, experts, "gated", gates=gates)
    gen = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 32, generator=gen)
    sigma = torch.tensor([2.0, 2.0])
    with torch.inference_mode():
        unload_all()
        import comfy.model_management

        comfy.model_management.load_models_gpu([m])
        both = m.model.apply_model(x, sigma, c_crossattn=ctx)
        rows = [g.clone() for g in g.holders[0].mix.live_gates.values()]
        one = torch.cat([m.model.apply_model(x[i:i + 1], sigma[:1], c_crossattn=ctx[i:i + 1]) for i in range(2)])
        unload_all()
    assert all(r.shape[0] == 2 for r in rows) and any((r[0] - r[1]).abs().max() > 1e-4 for r in rows)
    assert rel(both, one) <= 1e-5


def test_gated_constant_gates_equal_static_and_masking_renormalises(mole, tiny, experts, comfy_dirs):
    model, _ = tiny
    three = load(mole, model, None, ("a.safetensors", 1.0, True), ("b.safetensors", 0.5, True),
                 ("c.safetensors", 1.0, True))
    gates = constant_gates(mole, model, three, comfy_dirs["mole_gates"], "const.safetensors", [0.5, 0.3, 0.2])
    gated, _, _ = apply(mole, model, three, "gated", gates=gates)
    static, _, _ = apply(mole, model, three, "static weights", "0.5, 0.3, 0.2")
    masked, _, _ = apply(mole, model, three, "gated", gates=gates, mask="1, 0, 1")
    renorm, _, _ = apply(mole, model, three, "static weights", f"{0.5 / 0.7}, 0, {0.2 / 0.7}")
    with torch.inference_mode():
        assert rel(sample(gated), sample(static)) <= 1e-5
        assert rel(sample(masked), sample(renorm)) <= 1e-5


def test_sigmoid_gate_files_run_each_expert_on_its_own_and_masking_only_zeroes(mole, tiny, experts, comfy_dirs):
    """A format-2 sigmoid gate file (as the CLI's compose training writes) in MoLE Load Gates + MoLE Apply:
    gates that sum to more than 1 equal the same static weights; masking zeroes without renormalising."""
    model, _ = tiny
    three = load(mole, model, None, ("a.safetensors", 1.0, True), ("b.safetensors", 0.5, True),
                 ("c.safetensors", 1.0, True))
    gates = constant_sigmoid_gates(mole, model, three, comfy_dirs["mole_gates"], "sig.safetensors", [0.9, 0.6, 0.3])
    assert gates.gate_file.config.family == "sigmoid" and gates.gate_file.info["version"] == 2
    gated, _, _ = apply(mole, model, three, "gated", gates=gates)
    static, _, _ = apply(mole, model, three, "static weights", "0.9, 0.6, 0.3")
    masked, _, _ = apply(mole, model, three, "gated", gates=gates, mask="1, 0, 1")
    zeroed, _, _ = apply(mole, model, three, "static weights", "0.9, 0, 0.3")
    with torch.inference_mode():
        assert rel(sample(gated), sample(static)) <= 1e-5
        assert rel(sample(masked), sample(zeroed)) <= 1e-5


def test_gated_two_resolutions_one_gate_file_and_timestep_statistics(mole, tiny, experts, comfy_dirs, base_out):
    model, _ = tiny
    gates = random_gates(mole, model, experts, comfy_dirs["mole_gates"], "two_res.safetensors")
    m, _, g = apply(mole, model, experts, "gated", gates=gates, buckets=3)
    with torch.inference_mode():
        small, large = sample(m, size=16, steps=3), sample(m, size=24, steps=3)
    assert small.shape[-1] == 16 and large.shape[-1] == 24
    assert torch.isfinite(large).all() and rel(small, base_out) > 1e-3
    stats = g.statistics()
    assert stats["samples"] > 0 and set(stats["by_bucket"]) == {"0", "1", "2"}
    means = torch.tensor(list(stats["mean"].values()))
    assert torch.allclose(means.sum(-1), torch.ones(len(means)), atol=1e-5)
    assert means.std() > 1e-3  # input-dependent gates, not uniform


def test_last_run_registry_and_text_encoder_gates_kept_without_clip(mole, tiny, experts, comfy_dirs):
    from comfy_api.latest import io

    model, clip = tiny
    gates = random_gates(mole, model, experts, comfy_dirs["mole_gates"], "with_te.safetensors", clip=clip)
    node = mole.apply.MoleApply.PREPARE_CLASS_CLONE({io.Hidden.unique_id: "42"})
    with torch.inference_mode():
        m, _, live = node.execute(model=model, experts=experts, mode="gated", strength=1.0, weights="", mask="",
                                  timestep_buckets=2, gates=gates).args
        sample(m, steps=2)
    run = mole.injection.last_run("42")
    assert run["experts"] == ["a.safetensors", "b.safetensors"] and run["summary"]["samples"] == 2 * 2 * 18
    assert set(run["summary"]["by_bucket"]) <= {"0", "1"}
    assert {s for s in gates.gate_file.scopes if s.startswith("te:")} <= set(live.gate_file.scopes)


def test_gated_clip_part_changes_conditioning(mole, tiny, experts):
    model, clip = tiny
    _, c, g = apply(mole, model, experts, "gated", clip=clip)
    _, c_uni, _ = apply(mole, model, experts, "uniform (NLA)", clip=clip)
    with torch.inference_mode():
        assert rel(encode(c), encode(c_uni)) <= 1e-5  # fresh gates are uniform
        assert torch.equal(encode(clip), encode(tiny[1]))
    assert {h.component for h in g.holders} == {"unet", "te"}
    assert any(s.startswith("te:") for s in g.statistics()["mean"])


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "static weights", "weights": "0.5"}, r"`weights` has 1 values but there are 2 experts"),
    ({"mode": "static weights", "weights": "0.5, x"}, r"'x' is not a number"),
    ({"mode": "gated", "mask": "0, 0"}, r"switches every expert off"),
    ({"mode": "gated", "mask": "1, 0, 1"}, r"`mask` has 3 values"),
])
def test_apply_bad_inputs_are_one_line_errors(mole, tiny, experts, kwargs, match):
    import mole_core

    with pytest.raises(mole_core.MoleError, match=match):
        apply(mole, tiny[0], experts, **kwargs)


def test_gates_for_other_experts_are_refused(mole, tiny, experts, comfy_dirs):
    import mole_core

    model, _ = tiny
    gates = random_gates(mole, model, experts, comfy_dirs["mole_gates"], "ab.safetensors")
    swapped = load(mole, model, None, ("b.safetensors", 1.0, True), ("a.safetensors", 1.0, True))
    with pytest.raises(mole_core.MoleError, match=r"ab.safetensors: expert 1 should be 'a.safetensors'.*order differs"):
        apply(mole, model, swapped, "gated", gates=gates)
    with pytest.raises(mole_core.MoleError, match="already carries a gated MoLE"):
        gated, _, _ = apply(mole, model, experts, "gated")
        apply(mole, gated, experts, "gated")
