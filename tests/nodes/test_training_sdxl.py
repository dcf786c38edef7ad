"""MoLE Train Gates on SDXL (issue #16): ComfyUI's own ``model_base.SDXL`` and ``SDXLClipModel`` (CLIP-L + CLIP-G,
ADM conditioning from the pooled CLIP-G output and SDXL's size/crop embeddings) at tiny width, SDXL's block
layout. The gates train (the denoise loss falls), the node writes a gate file in ``wait`` and ``background`` mode,
MoLE Load Gates reads it and MoLE Apply samples with it at a square and a non-square size; the CLI's engine on a
diffusers SDXL UNet with the same weights gives the same output with that gate file."""

from __future__ import annotations

import pytest
import torch

from tests.nodes._helpers import comfy_unet, diffusers_twin, sample_text
from tests.nodes._nodes import apply, load, load_gates, train_and_measure
from tests.nodes.test_training import last_job, train_node, wait_done

pytestmark = [pytest.mark.comfy, pytest.mark.slow]


def sample_sdxl(model, clip, width: int, height: int, steps: int = 3) -> torch.Tensor:
    """``comfy.sample.sample`` (euler, CFG 5) with SDXL conditioning: both encoders, pooled output and size."""
    return sample_text(model, clip, width, height, steps, size_cond=True)


@pytest.fixture(scope="module")
def sdxl():
    from tests.nodes.testing_pack.tiny_comfy import tiny_sdxl_clip, tiny_sdxl_model

    with torch.inference_mode():
        return tiny_sdxl_model(0), tiny_sdxl_clip(1)


@pytest.fixture(scope="module")
def sdxl_experts(mole, sdxl, comfy_dirs):
    from tests.nodes import _loras

    model, _ = sdxl
    for i, name in enumerate(("xl_a", "xl_b")):
        lora = _loras.random_lora(model, None, seed=20 + i, rank=4, alpha=2.0, conv=False)
        _loras.write_kohya(lora, comfy_dirs["loras"] / f"{name}.safetensors")
    return load(mole, model, None, ("xl_a.safetensors", 1.0, True), ("xl_b.safetensors", 1.0, True))


def test_sdxl_gates_train_and_lower_the_denoise_loss(mole, sdxl, vae, sdxl_experts, images):
    model, clip = sdxl
    before, after, cache = train_and_measure(mole, model, clip, vae, sdxl_experts, images)
    assert all(c["y"].shape[-1] == 32 + 6 * 256 for c in cache.conds)  # ADM: pooled CLIP-G + 6 size embeddings
    print(f"\nSDXL denoise loss on the references: uniform gates {before:.5f} → trained {after:.5f}")
    assert after < before


@pytest.mark.parametrize("run", ["wait", "background"])
def test_sdxl_train_node_writes_gates_that_load_and_sample_at_two_sizes(mole, sdxl, vae, sdxl_experts,
                                                                        images, run):
    train_node(mole, sdxl, vae, sdxl_experts, images, f"sdxl/{run}", run=run, steps=4)
    job = last_job(mole)
    if run == "background":
        job = wait_done(mole, job)
    assert job.status == "done", job.error
    assert [h["step"] for h in job.history] == [1, 2, 3, 4]
    saved = load_gates(mole, f"sdxl/{run}.safetensors")
    assert saved.gate_file.info["training"]["steps_done"] == 4
    scopes = set(saved.gate_file.scopes)
    assert any(s.startswith("unet:down_blocks.1.attentions") for s in scopes)  # SDXL's input_blocks 4–5
    assert any(s.startswith("unet:mid_block.attentions") for s in scopes)
    model, clip = sdxl
    m, _, _ = apply(mole, model, sdxl_experts, "gated", gates=saved)
    for width, height in ((64, 64), (96, 64)):
        with torch.inference_mode():
            mixed, base = sample_sdxl(m, clip, width, height), sample_sdxl(model, clip, width, height)
        assert mixed.shape[-2:] == (height // 8, width // 8) and torch.isfinite(mixed).all()
        assert (mixed - base).abs().max() > 1e-4  # the experts act


def test_sdxl_static_and_nla_equal_chained_lora_loaders(mole, sdxl, sdxl_experts, comfy_dirs):
    from tests.nodes._helpers import lora_loader

    model, clip = sdxl
    loras = comfy_dirs["loras"]
    with torch.inference_mode():
        base = sample_sdxl(model, clip, 64, 64)
    for mode, weights, strengths in (("static weights", "0.7, 0.4", (0.7, 0.4)), ("uniform (NLA)", "", (0.5, 0.5))):
        m, _, _ = apply(mole, model, sdxl_experts, mode, weights)
        ref, _ = lora_loader(model, None, loras / "xl_a.safetensors", strengths[0])
        ref, _ = lora_loader(ref, None, loras / "xl_b.safetensors", strengths[1])
        with torch.inference_mode():
            ours, oracle = sample_sdxl(m, clip, 64, 64), sample_sdxl(ref, clip, 64, 64)
        assert (ours - oracle).abs().max() <= 1e-4, mode
        assert (ours - base).abs().max() > 1e-2, mode  # the experts act


def test_sdxl_block_labels_and_inspire_block_weights(mole, sdxl, sdxl_experts):
    model, _ = sdxl
    _, _, gates = apply(mole, model, sdxl_experts, "gated")
    with torch.inference_mode():
        payload = mole.gates.MoleVisualizeGates.execute(gates=gates, by_timestep=False, scale=1).ui["mole_gates"][0]
    attn = {label for label in payload["labels"] if ".attn" in label}
    assert attn == {"down1.attn0", "down1.attn1", "down2.attn0", "down2.attn1", "mid.attn0",
                    "up0.attn0", "up0.attn1", "up0.attn2", "up1.attn0", "up1.attn1", "up1.attn2"}
    with torch.inference_mode():
        out = mole.bake.MoleBake.execute(model=model, experts=sdxl_experts, weights_from="static weights",
                                         weights="1, 0.5", strength=1.0, save_lora=False, filename_prefix="x")
    lines = out.args[2].splitlines()  # SDXL in Inspire's semantics: BASE + input 4,5,7,8 + middle + output 0…5
    assert lines == ["xl_a:" + ",".join(["1"] * 12), "xl_b:" + ",".join(["0.5"] * 12)]
    keys = sdxl_experts.entries[0].model_keys.values()
    want = {(0, i) for i in (4, 5, 7, 8)} | {(1, 1)} | {(2, i) for i in range(6)}
    assert {mole.lbw.block_of(k) for k in keys} == want


def test_sdxl_loras_with_both_text_encoders_equal_chained_lora_loaders(mole, sdxl, comfy_dirs):
    """kohya SDXL files with ``lora_te1_`` (CLIP-L) and ``lora_te2_`` (CLIP-G) parts: MoLE's static mix of the UNet
    and both text encoders equals chained ``LoraLoader``s, conditioning and pooled output included."""
    from tests.nodes import _loras
    from tests.nodes._helpers import lora_loader

    model, clip = sdxl
    for i, name in enumerate(("xl_te_a", "xl_te_b")):
        lora = _loras.random_lora(model, clip, seed=30 + i, rank=4, alpha=2.0, conv=False)
        assert {"unet", "te", "te2"} <= lora.components()
        _loras.write_kohya(lora, comfy_dirs["loras"] / f"{name}.safetensors")
    experts = load(mole, model, clip, ("xl_te_a.safetensors", 1.0, True), ("xl_te_b.safetensors", 1.0, True))
    m, c, _ = apply(mole, model, experts, "static weights", "0.7, 0.4", clip=clip)
    ref_m, ref_c = lora_loader(model, clip, comfy_dirs["loras"] / "xl_te_a.safetensors", 0.7)
    ref_m, ref_c = lora_loader(ref_m, ref_c, comfy_dirs["loras"] / "xl_te_b.safetensors", 0.4)

    def encoded(cl):  # noqa: ANN001, ANN202
        cond, pooled = cl.encode_from_tokens(cl.tokenize("a photo of a cat"), return_pooled=True)
        return cond, pooled
    with torch.inference_mode():
        (cond, pooled), (cond_ref, pooled_ref), (cond_base, _) = encoded(c), encoded(ref_c), encoded(clip)
        ours, oracle = sample_sdxl(m, c, 64, 64), sample_sdxl(ref_m, ref_c, 64, 64)
    assert torch.allclose(cond, cond_ref, atol=1e-5) and torch.allclose(pooled, pooled_ref, atol=1e-5)
    assert (cond[..., 32:] - cond_base[..., 32:]).abs().max() > 1e-3  # CLIP-G's half of the context moves too
    assert (ours - oracle).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def diffusers_sdxl_unet(sdxl):
    pytest.importorskip("diffusers")
    return diffusers_twin(sdxl[0])


def _sdxl_inputs(cfg: dict) -> dict:
    """Latents, timesteps, context, the pooled CLIP-G output and SDXL's size/crop ids (64² and 96×64)."""
    gen = torch.Generator().manual_seed(31)
    pooled = torch.randn(2, cfg["adm_in_channels"] - 6 * 256, generator=gen)
    return {"x": torch.randn(2, 4, 8, 12, generator=gen), "t": torch.tensor([700.0, 300.0]),
            "ctx": torch.randn(2, 7, cfg["context_dim"], generator=gen), "pooled": pooled,
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [64, 96, 0, 0, 64, 96]])}


def _comfy_sdxl_forward(m, inp: dict) -> torch.Tensor:
    """The UNet call as ComfyUI's SDXL makes it: ``y`` = pooled output + a 256-wide embedding of each size id."""
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    y = torch.cat([inp["pooled"], timestep_embedding(inp["time_ids"].flatten(), 256).reshape(2, -1)], dim=1)
    return comfy_unet(m, inp["x"], inp["t"], inp["ctx"], y=y)


def _diffusers_sdxl_forward(unet, inp: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(inp["x"], inp["t"], encoder_hidden_states=inp["ctx"],
                    added_cond_kwargs={"text_embeds": inp["pooled"], "time_ids": inp["time_ids"]}).sample


def test_sdxl_gate_file_from_the_train_node_runs_the_same_in_the_cli(mole, sdxl, vae, sdxl_experts, images,
                                                                     comfy_dirs, diffusers_sdxl_unet):
    """A gate file MoLE Train Gates wrote on SDXL loads in the CLI's engine on a diffusers SDXL UNet with the same
    weights, and both mixtures give the same output (ADM conditioning included), ≤ 1e-4."""
    import mole_core
    from tests.nodes._nodes import rel

    model, _ = sdxl
    inp = _sdxl_inputs(model.model.model_config.unet_config)
    bare = _diffusers_sdxl_forward(diffusers_sdxl_unet, inp)
    assert rel(_comfy_sdxl_forward(model, inp), bare) <= 1e-4  # the two UNets are one model
    train_node(mole, sdxl, vae, sdxl_experts, images, "sdxl/for_cli", run="wait", steps=2)
    assert last_job(mole).status == "done"
    m, _, _ = apply(mole, model, sdxl_experts, "gated", gates=load_gates(mole, "sdxl/for_cli.safetensors"))
    ours = _comfy_sdxl_forward(m, inp)
    cli_experts = mole_core.load_experts([comfy_dirs["loras"] / f"xl_{k}.safetensors" for k in "ab"])
    gate_file = comfy_dirs["mole_gates"] / "sdxl" / "for_cli.safetensors"
    with mole_core.attach(diffusers_sdxl_unet, cli_experts, gates=gate_file):
        reference = _diffusers_sdxl_forward(diffusers_sdxl_unet, inp)
    print(f"\nSDXL gate file, node vs CLI engine: {rel(ours, reference):.2e}; experts' effect "
          f"{rel(reference, bare):.2e}")
    assert rel(ours, reference) <= 1e-4
    assert rel(reference, bare) > 1e-3  # the gated experts act


def test_sdxl_trigger_gates_train_through_the_clip_copy_and_sample(mole, sdxl, vae, images, comfy_dirs):
    """gate_input trigger on SDXL: the job re-encodes the prompts through its copy of both text encoders (the
    pooled CLIP-G output feeds the ADM vector), the router in CLIP-L trains, and the file samples in MoLE Apply."""
    from tests.nodes import _loras

    model, clip = sdxl
    for i, word in enumerate(("crimson", "azure")):
        lora = _loras.random_lora(model, clip, seed=30 + i, rank=4, alpha=2.0, conv=False)
        _loras.write_kohya(lora, comfy_dirs["loras"] / f"{word}.safetensors")
    experts = load(mole, model, clip, ("crimson.safetensors", 1.0, True), ("azure.safetensors", 1.0, True))
    out = train_node(mole, sdxl, vae, experts, images, "sdxl/trigger", steps=3, gate_input="trigger",
                     gate_family="sigmoid", prompts="a crimson ball\na crimson ball\na azure cube\na azure cube",
                     concepts="crimson, azure")
    job = last_job(mole)
    assert job.status == "done", job.error
    gate_file = out.args[0].gate_file
    assert {"unet", "te", "te2"} <= set(gate_file.components())
    start = mole.train_node.initial_gates(model, experts, mole.train_node.node_config(
        "custom", steps=3, lr=0.05, alpha=0.5, granularity="block", gate_input="trigger", gate_family="sigmoid",
        objective="denoise", seed=0, resolution=64, batch_size=2), clip)
    assert not torch.equal(gate_file.tensors["router.bias"], start.tensors["router.bias"])
    m, c, _ = apply(mole, model, experts, "gated", gates=load_gates(mole, "sdxl/trigger.safetensors"), clip=clip)
    with torch.inference_mode():
        assert torch.isfinite(sample_sdxl(m, c, 64, 64)).all()
