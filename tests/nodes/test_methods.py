"""MoLE Apply's training-free modes, LoRA switch and LoRA composite, against ComfyUI's own LoraLoader and
against the CLI's diffusers implementation on the same weights."""

from __future__ import annotations

import comfy.model_management
import comfy.patcher_extension
import pytest
import torch

from tests.nodes._helpers import lora_loader, sample
from tests.nodes._nodes import apply, load, rel
from tests.nodes.test_cli_compat import diffusers_unet, inputs  # noqa: F401  (fixtures)

pytestmark = pytest.mark.comfy


def loaded_call(m, x, sigma, ctx, extra_options: dict | None = None) -> torch.Tensor:
    """``BaseModel.apply_model`` as a sampler calls it, with the patcher's wrappers (ours included)."""
    opts = {"wrappers": m.wrappers, **(extra_options or {})}
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        comfy.model_management.load_models_gpu([m])
        try:
            return m.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=opts).clone()
        finally:
            comfy.model_management.unload_all_models()


@pytest.fixture(scope="module")
def call_inputs():
    gen = torch.Generator().manual_seed(5)
    return torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([5.0, 0.8]), torch.randn(2, 7, 32, generator=gen)


def test_switch_every_k_at_least_steps_is_the_first_lora_alone(mole, tiny, files, experts):
    m, _, _ = apply(mole, tiny[0], experts, "LoRA switch", switch_every=3)
    with torch.inference_mode():
        ours = sample(m, steps=3)
        first = sample(lora_loader(tiny[0], None, files["a"], 1.0)[0], steps=3)
        second = sample(lora_loader(tiny[0], None, files["b"], 1.0)[0], steps=3)
    assert rel(first, second) > 1e-3
    assert rel(ours, first) <= 1e-4


@pytest.mark.parametrize("sampler, steps, want", [("euler", 4, [0, 1, 0, 1]), ("heun", 3, None)])
def test_switch_every_step_alternates_in_the_recorded_gates(mole, tiny, experts, sampler, steps, want):
    import comfy.sample

    from tests.nodes._helpers import tiny_cond

    m, _, gates = apply(mole, tiny[0], experts, "LoRA switch", switch_every=1)
    latent = torch.zeros(1, 4, 16, 16)
    with torch.inference_mode():
        comfy.sample.sample(m, comfy.sample.prepare_noise(latent, 0), steps, 5.0, sampler, "normal", tiny_cond(10),
                            tiny_cond(11), latent, disable_pbar=True, seed=0)
    stats = gates.statistics()
    by_step = {int(b): per_scope for b, per_scope in stats["by_bucket"].items()}
    assert stats["bucket_labels"]["0"] == "step 0"
    if want is None:  # Heun: its extra call at σ_{i+1} counts as step i + 1; every step gets one expert
        want = [s % 2 for s in sorted(by_step)]
        assert sorted(by_step) == list(range(steps))
    assert sorted(by_step) == list(range(len(want)))
    for step, expert in enumerate(want):
        for g in by_step[step].values():
            assert g == [1.0 if i == expert else 0.0 for i in range(2)], (step, g)
    with torch.inference_mode():  # the heatmap shows one column group per sampling step
        payload = mole.gates.MoleVisualizeGates.execute(gates=gates, by_timestep=True, scale=1).ui["mole_gates"][0]
    assert payload["bucket_labels"]["1"] == "step 1" and len(payload["buckets"]) == len(want)


def test_composite_is_the_mean_of_each_loraloader_model_in_one_batched_call(mole, tiny, files, experts, call_inputs):
    m, _, _ = apply(mole, tiny[0], experts, "LoRA composite")
    calls = []
    probe = lambda executor, x, *a, **k: calls.append(x.shape[0]) or executor(x, *a, **k)  # noqa: E731
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "probe", probe)
    x, sigma, ctx = call_inputs
    ours = loaded_call(m, x, sigma, ctx)
    assert calls == [4]  # one UNet call on N · B rows
    each = [loaded_call(lora_loader(tiny[0], None, files[k], 1.0)[0], x, sigma, ctx) for k in ("a", "b")]
    assert rel(each[0], each[1]) > 1e-3
    assert rel(ours, (each[0] + each[1]) / 2) <= 1e-4


def test_composite_of_one_expert_is_that_lora_with_cfg(mole, tiny, files, comfy_dirs):
    model, clip = tiny
    single = load(mole, model, clip, ("a.safetensors", 1.0, True))
    m, _, _ = apply(mole, model, single, "LoRA composite")
    with torch.inference_mode():
        assert rel(sample(m), sample(lora_loader(model, None, files["a"], 1.0)[0])) <= 1e-4


@pytest.mark.parametrize("mode", ["LoRA composite", "LoRA switch"])
def test_masked_experts_are_skipped(mole, tiny, files, experts, mode):
    m, _, _ = apply(mole, tiny[0], experts, mode, mask="0, 1")
    with torch.inference_mode():
        assert rel(sample(m), sample(lora_loader(tiny[0], None, files["b"], 1.0)[0])) <= 1e-4


@pytest.mark.parametrize("method", ["composite", "switch"])
def test_comfyui_and_diffusers_give_the_same_prediction(mole, tiny, files, experts, diffusers_unet, inputs,  # noqa: F811
                                                        method):
    """The same UNet call through MoLE Apply's wrapper in ComfyUI and through the CLI's hooks on the diffusers
    UNet with the very same weights (switch: at step 1 of a 3-step schedule, i.e. expert b)."""
    import mole_core
    from train.method_hooks import MethodHooks

    x, t, ctx = inputs
    m, _, gates = apply(mole, tiny[0], experts, f"LoRA {method}")
    holder = gates.holders[0]
    options = {"sample_sigmas": torch.tensor([10.0, 5.0, 1.0, 0.0]), "sigmas": torch.tensor([5.0, 5.0])}
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        comfy.model_management.load_models_gpu([m])
        try:
            ours = holder.diffusion_model_wrapper(m.model.diffusion_model, x, t, context=ctx,
                                                  transformer_options=options).clone()
        finally:
            comfy.model_management.unload_all_models()
    mix = mole_core.attach(diffusers_unet, mole_core.load_experts([files["a"], files["b"]]), mode="uniform")
    hooks = MethodHooks(diffusers_unet, mix, method, timesteps=[900, t[0].item(), 100])
    try:
        with torch.no_grad():
            theirs = diffusers_unet(x, t, encoder_hidden_states=ctx).sample
    finally:
        hooks.detach()
        mix.detach()
    assert rel(ours, theirs) <= 1e-4
    if method == "switch":
        assert hooks.steps == [1] and holder.mix.stats.bucket == 1
