"""SD2.x 768-v (issue #16): ComfyUI's own ``SD20`` model config (linear ``proj_in``, v-prediction) and
``SD2ClipModel`` (OpenCLIP-H layout, penultimate layer) at tiny width. Static and NLA mixes equal chained
``LoraLoader``s (UNet and the ``lora_te_`` CLIP-H part); MoLE Train Gates trains it in ``wait`` and ``background``
mode (the v-prediction denoise loss falls) and its gate file loads and samples, in the nodes and in the CLI's engine
on a diffusers UNet with the same weights."""

from __future__ import annotations

import math

import pytest
import torch

from tests.nodes._helpers import sample_text
from tests.nodes._nodes import apply, load, load_gates, train_and_measure
from tests.nodes.test_training import last_job, train_node, wait_done

pytestmark = [pytest.mark.comfy, pytest.mark.slow]


def sample_sd2(model, clip, steps: int = 3, size: int = 64) -> torch.Tensor:
    """``comfy.sample.sample`` (euler, CFG 5) with the model's own text encoder."""
    return sample_text(model, clip, size, size, steps)


@pytest.fixture(scope="module")
def sd2():
    from tests.nodes.testing_pack.tiny_comfy import tiny_sd2_clip, tiny_sd2_model

    with torch.inference_mode():
        return tiny_sd2_model(0), tiny_sd2_clip(1)


@pytest.fixture(scope="module")
def sd2_experts(mole, sd2, comfy_dirs):
    """Two kohya LoRAs on the UNet (attention, linear ``proj_in`` included, and 3×3 convs) and on CLIP-H."""
    from tests.nodes import _loras

    model, clip = sd2
    for i, name in enumerate(("sd2_a", "sd2_b")):
        lora = _loras.random_lora(model, clip, seed=40 + i, rank=4, alpha=2.0)
        assert lora.components() == {"unet", "te"}
        _loras.write_kohya(lora, comfy_dirs["loras"] / f"{name}.safetensors")
    return load(mole, model, clip, ("sd2_a.safetensors", 1.0, True), ("sd2_b.safetensors", 1.0, True))


def test_sd2_model_is_v_prediction_with_linear_projections(sd2):
    import comfy.model_base

    model, clip = sd2
    assert model.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    assert model.model.diffusion_model.state_dict()["input_blocks.1.1.proj_in.weight"].dim() == 2  # linear
    assert any(k.startswith("clip_h.") for k in clip.cond_stage_model.state_dict())


def test_sd2_static_and_nla_equal_chained_lora_loaders(mole, sd2, sd2_experts, comfy_dirs):
    from tests.nodes._helpers import lora_loader

    model, clip = sd2
    loras = comfy_dirs["loras"]
    with torch.inference_mode():
        base = sample_sd2(model, clip)
        base_cond = clip.encode_from_tokens(clip.tokenize("a photo of a cat"))
    for mode, weights, strengths in (("static weights", "0.7, 0.4", (0.7, 0.4)), ("uniform (NLA)", "", (0.5, 0.5))):
        m, c, _ = apply(mole, model, sd2_experts, mode, weights, clip=clip)
        ref_m, ref_c = lora_loader(model, clip, loras / "sd2_a.safetensors", strengths[0])
        ref_m, ref_c = lora_loader(ref_m, ref_c, loras / "sd2_b.safetensors", strengths[1])
        with torch.inference_mode():
            cond, cond_ref = (cl.encode_from_tokens(cl.tokenize("a photo of a cat")) for cl in (c, ref_c))
            ours, oracle = sample_sd2(m, c), sample_sd2(ref_m, ref_c)
        assert torch.allclose(cond, cond_ref, atol=1e-5), mode
        assert (cond - base_cond).abs().max() > 1e-3, mode  # the CLIP-H parts act
        assert (ours - oracle).abs().max() <= 1e-4, mode
        assert (ours - base).abs().max() > 1e-2, mode  # the experts act


def test_sd2_v_gates_train_and_lower_the_denoise_loss(mole, sd2, vae, sd2_experts, images):
    model, clip = sd2
    before, after, _ = train_and_measure(mole, model, clip, vae, sd2_experts, images)
    print(f"\nSD2.x-v denoise loss on the references: uniform gates {before:.5f} → trained {after:.5f}")
    assert after < before


@pytest.mark.parametrize("run", ["wait", "background"])
def test_sd2_train_node_writes_gates_that_load_and_sample(mole, sd2, vae, sd2_experts, images, run):
    name = f"sd2/{run}"
    train_node(mole, sd2, vae, sd2_experts, images, name, run=run, steps=4)
    job = last_job(mole)
    if run == "background":
        job = wait_done(mole, job)
    assert job.status == "done", job.error
    assert [h["step"] for h in job.history] == [1, 2, 3, 4] and all(math.isfinite(h["loss"]) for h in job.history)
    saved = load_gates(mole, f"{name}.safetensors")
    assert saved.gate_file.info["training"]["steps_done"] == 4
    assert any(s.startswith("unet:mid_block.attentions") for s in saved.gate_file.scopes)
    model, clip = sd2
    m, c, _ = apply(mole, model, sd2_experts, "gated", gates=saved, clip=clip)
    with torch.inference_mode():
        mixed, base = sample_sd2(m, c), sample_sd2(model, clip)
    assert torch.isfinite(mixed).all() and (mixed - base).abs().max() > 1e-4  # the experts act


def test_sd2_gate_file_from_the_train_node_runs_the_same_in_the_cli(mole, sd2, vae, sd2_experts, images,
                                                                    comfy_dirs):
    """A gate file MoLE Train Gates wrote on SD2.x loads in the CLI's engine on a diffusers UNet with the same weights
    (linear projections), and both mixtures give the same output, ≤ 1e-4."""
    pytest.importorskip("diffusers")
    import mole_core
    from tests.nodes._helpers import comfy_unet, diffusers_twin
    from tests.nodes._nodes import rel

    model, _ = sd2
    unet = diffusers_twin(model)
    gen = torch.Generator().manual_seed(41)
    x, ctx = torch.randn(2, 4, 8, 12, generator=gen), torch.randn(2, 7, 32, generator=gen)
    t = torch.tensor([700.0, 300.0])

    def cli_forward():  # noqa: ANN202
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=ctx).sample

    bare = cli_forward()
    assert rel(comfy_unet(model, x, t, ctx), bare) <= 1e-4  # the two UNets are one model
    train_node(mole, sd2, vae, sd2_experts, images, "sd2/for_cli", run="wait", steps=2)
    assert last_job(mole).status == "done"
    m, _, _ = apply(mole, model, sd2_experts, "gated", gates=load_gates(mole, "sd2/for_cli.safetensors"))
    ours = comfy_unet(m, x, t, ctx)
    cli_experts = mole_core.load_experts([comfy_dirs["loras"] / f"sd2_{k}.safetensors" for k in "ab"])
    with mole_core.attach(unet, cli_experts, gates=comfy_dirs["mole_gates"] / "sd2" / "for_cli.safetensors"):
        reference = cli_forward()
    print(f"\nSD2.x gate file, node vs CLI engine: {rel(ours, reference):.2e}; experts' effect "
          f"{rel(reference, bare):.2e}")
    assert rel(ours, reference) <= 1e-4
    assert rel(reference, bare) > 1e-3  # the gated experts act
