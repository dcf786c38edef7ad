"""MoLE Train Gates with the text encoders' gates (gate_input router / trigger, recipe compose): the job's private
copy of the CLIP against ComfyUI's own encode, gradients into the text encoders' gates, and the node's compose
recipe end to end (trigger gates on UNet and CLIP, block search) into a gate file MoLE Apply runs."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.nodes._helpers import sample_text
from tests.nodes._nodes import apply, load, load_gates
from tests.nodes.test_training import COMPOSE, last_job, train_node
from tests.nodes.testing_pack.tiny_comfy import tiny_clip, tiny_sdxl_clip

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

PROMPTS = ["a red blue ball", "", "a (red:1.3) cube on grass"]


@pytest.fixture(scope="module")
def named_experts(mole, tiny, files, comfy_dirs):
    """The experts ``a`` and ``b`` saved as ``red.safetensors`` and ``blue.safetensors`` (trigger words)."""
    for src, word in (("a", "red"), ("b", "blue")):
        shutil.copy(files[src], comfy_dirs["loras"] / f"{word}.safetensors")
    model, clip = tiny
    return load(mole, model, clip, ("red.safetensors", 1.0, True), ("blue.safetensors", 1.0, True))


def _encode_all(clip, prompts):
    with torch.inference_mode():
        return [clip.encode_from_tokens(clip.tokenize(p), return_dict=True) for p in prompts]


@pytest.mark.parametrize("kind", ["sd1", "sd1_clip_skip", "sdxl"])
def test_the_private_copy_encodes_as_comfyuis_clip(mole, kind):
    with torch.inference_mode():
        clip = tiny_sdxl_clip(1) if kind == "sdxl" else tiny_clip(1)
    if kind == "sd1_clip_skip":  # CLIPSetLastLayer: the copy follows the CLIP's layer choice
        plain = _encode_all(clip, PROMPTS[:1])[0]["cond"]
        clip = clip.clone()
        clip.clip_layer(-2)
    want = _encode_all(clip, PROMPTS)
    if kind == "sd1_clip_skip":
        assert (want[0]["cond"] - plain).abs().max() > 1e-3
    text = mole.comfy_text.PrivateTextEncoder(clip)
    for prompt, w in zip(PROMPTS, want):
        got = text.encode(prompt)
        assert set(got) == set(w), prompt
        for key, value in w.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-6, msg=f"{prompt!r} {key}")
    params = [(p, q) for p, q in zip(text.model.parameters(), clip.cond_stage_model.parameters())]
    assert all(not p.is_inference() and not p.requires_grad for p, _ in params)
    assert all(p.data_ptr() != q.data_ptr() for p, q in params)  # its own weights


def test_text_gates_train_through_the_private_copy(mole, tiny, vae, named_experts, monkeypatch):
    """Without gates the backend's conditioning is ComfyUI's (the prompt table's base encoding); with trigger
    gates attached a prompt's loss reaches the text encoder's gates, never the copied weights."""
    import mole_core

    model, clip = tiny
    cb = mole.comfy_backend
    with torch.inference_mode():
        table = cb.PromptTable.encode(*(cb.ComfyEncoder(model.model, vae, clip, 64),) * 2, PROMPTS)
    text = mole.comfy_text.PrivateTextEncoder(clip)
    backend = cb.ComfyBackend(cb.private_copy(model, 0), prompts=table.to(torch.device("cpu")), text=text,
                              resolution=64)
    got = backend.encode_prompts(PROMPTS)
    want = cb.PromptTable.lookup(table.base, PROMPTS)
    torch.testing.assert_close(got["c_crossattn"], want["c_crossattn"], atol=1e-6, rtol=1e-6)
    cfg = mole_core.GateConfig(gate_input="trigger", family="sigmoid", granularity="block")
    mix = mole_core.attach(backend.mixture_target(), mole.train_node.normal_experts(named_experts), cfg)
    assert {s.split(":")[0] for s in mix.scopes} >= {"unet", "te"}
    mole_core.calibrate_triggers(mix, backend.encode_prompts, PROMPTS, ["red", "blue"])
    gated = backend.encode_prompts(["a red blue ball"])
    assert (gated["c_crossattn"] - want["c_crossattn"][:1]).abs().max() > 1e-4  # the LoRAs' text parts run
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])

    def loss() -> torch.Tensor:
        return backend.predict(x, t, backend.encode_prompts(["a red blue ball"])).square().mean()

    loss().backward()
    te = tuple(f"s{i}." for i, scope in enumerate(mix.scopes) if scope.startswith("te:"))
    te_params = {k: p for k, p in mix.gates.named_parameters() if k.startswith(te) and p.grad is not None}
    key, param = max(te_params.items(), key=lambda kv: float(kv[1].grad.abs().max()))
    assert float(param.grad.abs().max()) > 0, "no gradient reached the text encoder's gates"
    assert all(p.grad is None for p in text.model.parameters())
    assert all(p.grad is None for p in backend.model.parameters())
    # the right gradient: ComfyUI's in-place residuals (x += attn(norm(x))) would corrupt it, so compare with the
    # same layer written out of place
    import comfy.clip_model

    def out_of_place(layer, x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))

    got = {k: p.grad.clone() for k, p in mix.gates.named_parameters() if p.grad is not None}
    mix.gates.zero_grad(set_to_none=True)
    monkeypatch.setattr(comfy.clip_model.CLIPLayer, "forward", out_of_place)
    loss().backward()
    want = {k: p.grad for k, p in mix.gates.named_parameters() if p.grad is not None}
    assert set(got) == set(want) and key in got
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-7, rtol=1e-5, msg=k)
    mix.detach()


COMPOSE_INPUTS = {k: COMPOSE[k] for k in ("prompts", "concepts", "composition_prompts", "base_prompts")}


def test_the_compose_recipe_trains_trigger_gates_and_searches_in_the_node(mole, tiny, vae, images, named_experts,
                                                                          comfy_dirs, clip_guide, monkeypatch):
    """recipe compose = `mole-train train --recipe compose`: trigger gates on the UNet and the CLIP, trained
    through the job's CLIP copy, then the block search (its candidates counted in progress records); the file
    loads in MoLE Load Gates and runs in MoLE Apply with the CLIP."""
    from train.recipes import recipe_fields

    seen: list[dict] = []
    monkeypatch.setattr(mole.jobs, "send", lambda event, data: seen.append({"event": event, **data}))
    out = train_node(mole, tiny, vae, named_experts, images, "compose/recipe", steps=2, batch_size=2,
                     recipe="compose", gate_input="input", objective="denoise", alpha=0.5, **COMPOSE_INPUTS,
                     **clip_guide)
    job = last_job(mole)
    assert job.status == "done", job.error
    gate_file = out.args[0].gate_file
    training = gate_file.info["training"]
    assert {k: training[k] for k in recipe_fields("compose")} == recipe_fields("compose")  # the inputs it sets lost
    assert training["steps"] == 2 and training["resolution"] == 64
    assert {"unet", "te"} <= set(gate_file.components())
    start = mole.train_node.initial_gates(tiny[0], named_experts, mole.train_node.node_config(
        "compose", steps=2, lr=0.05, seed=0, resolution=64, batch_size=2), tiny[1])
    assert any(k.startswith("gates.te:") for k in gate_file.tensors)
    moved = [k for k in ("router.scale", "router.bias") if not torch.equal(gate_file.tensors[k], start.tensors[k])]
    assert moved, "the router in the text encoder did not train"
    assert any(k.endswith(".sets") for k in gate_file.tensors), "the block search wrote no per-set scales"
    progress = [e for e in seen if e["event"] == "mole.progress"]
    searched = [e for e in progress if e.get("phase") == "block_search"]
    assert searched and searched[-1]["candidate"] == searched[-1]["candidates"], progress[-3:]
    assert [h["step"] for h in job.history] == [1, 2]  # search records are progress, not history
    saved = load_gates(mole, "compose/recipe.safetensors")
    m, c, _ = apply(mole, tiny[0], named_experts, "gated", gates=saved, clip=tiny[1])
    with torch.inference_mode():
        assert torch.isfinite(sample_text(m, c)).all()


@pytest.mark.parametrize("gate_input", ["router", "trigger"])
def test_router_and_trigger_gates_train_in_the_node_without_a_recipe(mole, tiny, vae, images, named_experts,
                                                                      comfy_dirs, gate_input):
    """custom inputs: gate_input router / trigger train the text encoders' gates too (on the denoising loss,
    each step re-encoding the references' prompts through the job's CLIP copy)."""
    out = train_node(mole, tiny, vae, named_experts, images, f"text/{gate_input}", steps=3, gate_input=gate_input,
                     gate_family="sigmoid", prompts=COMPOSE["prompts"], concepts="red, blue")
    job = last_job(mole)
    assert job.status == "done", job.error
    gate_file = out.args[0].gate_file
    assert gate_file.info["training"]["train_text_gates"] is True
    assert gate_file.config.gate_input == gate_input and "te" in gate_file.components()
    start = mole.train_node.initial_gates(tiny[0], named_experts, mole.train_node.node_config(
        "custom", steps=3, lr=0.05, alpha=0.5, granularity="block", gate_input=gate_input, gate_family="sigmoid",
        objective="denoise", seed=0, resolution=64, batch_size=2), tiny[1])
    moved = [k for k, v in gate_file.tensors.items() if k.startswith(("router.", "gates.te:"))
             and k in start.tensors and not torch.equal(v, start.tensors[k])]
    assert moved, "no gate of the text encoder or its router moved"


@pytest.mark.parametrize("change, message", [
    ({"gate_input": "trigger", "concepts": ""}, "gate_input 'trigger' needs `concepts`"),
    ({"gate_input": "trigger", "concepts": "purple"}, "no reference prompt names 'purple'"),
    ({"recipe": "compose"}, "objective 'compose' needs `clip_guide`"),
    ({"recipe": "paper"}, "`recipe` must be one of"),
])
def test_text_gate_inputs_are_checked_before_any_work(mole, tiny, vae, images, named_experts, comfy_dirs, change,
                                                      message):
    import mole_core

    jobs_before = len(mole.jobs.worker().jobs())
    with pytest.raises(mole_core.MoleError, match=message):
        train_node(mole, tiny, vae, named_experts, images, "bad", **{**COMPOSE_INPUTS, "gate_family": "sigmoid",
                                                                     **change})
    assert len(mole.jobs.worker().jobs()) == jobs_before


def test_trigger_gates_need_loras_named_after_their_words(mole, tiny, vae, images, experts, comfy_dirs):
    import mole_core

    with pytest.raises(mole_core.MoleError, match=r"no LoRA file is named after one of `concepts` \(red, blue\).*"
                                                  r"got a.safetensors, b.safetensors"):
        train_node(mole, tiny, vae, experts, images, "bad", gate_input="trigger", gate_family="sigmoid",
                   **COMPOSE_INPUTS)
