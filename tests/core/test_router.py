"""``gate_input="router"``: one router on the first text-encoder layer decides per prompt for every scope.

Oracles: the router logit computed by hand from the q projection's input captured by our own hook
(``log mean_t exp(W·rms(f_t − c))``), the sigmoid gate ``m σ((ℓ + b)/τ)`` by hand, and a real diffusers pipeline
with classifier-free guidance (the UNet's cond rows must use the prompt's decision, the uncond rows the
negative prompt's — or, with ``negative_routing="positive"``, the prompt's too).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import mole_core as mole
from mole_core.gates import rms_normalize
from mole_core.routes import RouteTable, follow_positive
from tests.core._files import reloads_exactly
from tests.fixtures.tiny_models import sd15_pipeline

CFG = mole.GateConfig(gate_input="router", family="sigmoid", granularity="block", init_std=0.3)


@pytest.fixture
def pipe(tiny_sd15):
    return sd15_pipeline({k: copy.deepcopy(v) for k, v in tiny_sd15.items()})


def _randomise(mix: mole.Mixture, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mix.gates.named_parameters():
            if not name.endswith("log_tau"):
                p.copy_(torch.randn(p.shape, generator=g))
        mix.gates["router"].center.copy_(torch.randn(mix.gates["router"].center.shape, generator=g) * 0.1)


def _tokens(pipe, prompts: list[str]) -> torch.Tensor:
    return pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids


def _routes(pipe, mix: mole.Mixture, *prompts: str) -> list[torch.Tensor]:
    """The router logits ``(1, N)`` of each prompt, each encoded on its own (as diffusers encodes a prompt and
    its negative)."""
    out = []
    with torch.no_grad():
        for p in prompts:
            pipe.text_encoder(_tokens(pipe, [p]))
            out.append(mix._route.clone())
    return out


def test_every_scope_uses_the_hand_computed_route_of_its_prompt(pipe, lora_set):
    mix = mole.attach(pipe, mole.load_experts(lora_set.paths), CFG)
    _randomise(mix)
    assert mix.router_lead == "te:text_model.encoder.layers.0.self_attn.q_proj"
    assert all(s.feature_dim == 0 for s in mix.scopes.values())
    seen = {}
    q_proj = next(m for n, m in pipe.text_encoder.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    handle = q_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0].detach().clone()))
    prompts = ["a red square", "a blue circle on grey"]
    with torch.no_grad():
        ctx = pipe.text_encoder(_tokens(pipe, prompts))[0]
    handle.remove()
    router = mix.gates["router"]
    per_token = rms_normalize(seen["x"] - router.center) @ router.weight.T  # (B, L, N) by hand
    logits = (per_token.exp().mean(1)).log()
    assert logits.std() > 0.1  # the prompts route differently
    te_scopes = [s for s in mix.scopes if s.startswith("te:")]
    for s in te_scopes:
        g = mix.scope_gate(s)
        want = g.magnitude * torch.sigmoid((logits + g.bias) / g.tau)
        torch.testing.assert_close(mix.live_gates[s], want)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the UNet finds each row's route by its conditioning, in any row order
        pipe.unet(sample, torch.tensor([500, 500]), encoder_hidden_states=ctx.flip(0))
    unet_scopes = [s for s in mix.scopes if s.startswith("unet:")]
    assert len(unet_scopes) > 3 and mix.routes.misses == 0
    for s in unet_scopes:
        g = mix.scope_gate(s)
        want = g.magnitude * torch.sigmoid((logits.flip(0) + g.bias) / g.tau)
        torch.testing.assert_close(mix.live_gates[s], want)
    mix.detach()


def test_guided_sampling_routes_cond_and_uncond_rows_by_their_own_prompt(pipe, lora_set):
    mix = mole.attach(pipe, mole.load_experts(lora_set.paths), CFG)
    _randomise(mix)
    prompt, negative = "a purple star", "blurry"
    want_cond, want_uncond = _routes(pipe, mix, prompt, negative)
    unet_gates = []
    handle = pipe.unet.register_forward_hook(
        lambda m, a, o: unet_gates.append(mix.live_gates[next(s for s in mix.scopes if s.startswith("unet:"))]))
    pipe(prompt, negative_prompt=negative, num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    handle.remove()
    assert len(unet_gates) == 2 and mix.routes.misses == 0
    g = mix.scope_gate(next(s for s in mix.scopes if s.startswith("unet:")))
    for rows in unet_gates:  # diffusers batches [uncond, cond]
        torch.testing.assert_close(rows, g.magnitude * torch.sigmoid((torch.cat([want_uncond, want_cond]) + g.bias)
                                                                    / g.tau))
    mix.detach()


def test_positive_negative_routing_gives_the_uncond_rows_the_prompts_route(pipe, lora_set, tmp_path):
    """``negative_routing="positive"``: in diffusers' CFG batch ``[uncond, cond]`` both rows run at the prompt's
    gates; without guidance (two prompts, two latents) each row keeps its own prompt's; the gate file says so
    (version 5) and reads back with the setting."""
    cfg = mole.GateConfig(**{**CFG.to_dict(), "negative_routing": "positive"})
    experts = mole.load_experts(lora_set.paths)
    mix = mole.attach(pipe, experts, cfg)
    _randomise(mix)
    prompt, negative = "a purple star", "blurry"
    want_cond, want_uncond = _routes(pipe, mix, prompt, negative)
    assert (want_cond - want_uncond).abs().max() > 0.02
    scope = next(s for s in mix.scopes if s.startswith("unet:"))
    unet_gates = []
    handle = pipe.unet.register_forward_hook(lambda m, a, o: unet_gates.append(mix.live_gates[scope]))
    pipe(prompt, negative_prompt=negative, num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    g = mix.scope_gate(scope)
    assert len(unet_gates) == 2 and mix.routes.misses == 0
    for rows in unet_gates:
        torch.testing.assert_close(rows, g.magnitude * torch.sigmoid((torch.cat([want_cond, want_cond]) + g.bias)
                                                                    / g.tau))
    unet_gates.clear()
    pipe([prompt, negative], num_inference_steps=1, guidance_scale=1.0, height=64, width=64,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    handle.remove()
    torch.testing.assert_close(unet_gates[0], g.magnitude * torch.sigmoid((torch.cat([want_cond, want_uncond])
                                                                           + g.bias) / g.tau))
    path = mole.save_gates(mix, tmp_path / "positive.safetensors")
    mix.detach()
    gf = mole.read_gate_file(path)
    assert gf.info["version"] == 5 and gf.config.negative_routing == "positive"
    with pytest.raises(mole.MoleError, match="`negative_routing` must be one of"):
        mole.GateConfig(**{**CFG.to_dict(), "negative_routing": "negative"})


def test_follow_positive_by_hand():
    """Only unconditional rows change, each to the route of the conditional row that shares its latent."""
    routes = torch.arange(12.0).reshape(6, 2)
    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    same = torch.cat([x, x])
    torch.testing.assert_close(follow_positive(routes, same, None), torch.cat([routes[3:], routes[3:]]))
    comfy = follow_positive(routes, same, [0, 1])  # ComfyUI's cond_or_uncond: the cond chunk first
    torch.testing.assert_close(comfy, torch.cat([routes[:3], routes[:3]]))
    other = torch.cat([x, x[[0, 2, 1]]])  # rows 1 and 2 denoise other latents than their cond rows
    torch.testing.assert_close(follow_positive(routes, other, None), torch.cat([routes[[3]], routes[1:]]))
    for kinds in ([0, 0], [1, 1], [1, 0, 0, 1]):  # no pair, or chunks that do not divide 6 rows
        assert torch.equal(follow_positive(routes, same, kinds), routes)
    assert torch.equal(follow_positive(routes[:5], same[:5], None), routes[:5])


def test_the_unets_use_of_a_route_trains_the_router(pipe, lora_set):
    mix = mole.attach(pipe, mole.load_experts(lora_set.paths), CFG)
    ctx = pipe.text_encoder(_tokens(pipe, ["a red square"]))[0].detach()  # the context has no graph of its own
    out = pipe.unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), encoder_hidden_states=ctx).sample
    pipe.text_encoder.zero_grad(set_to_none=True)
    mix.gates.zero_grad(set_to_none=True)
    out.pow(2).mean().backward()
    grad = mix.gates["router"].weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    assert all(p.grad is None for p in pipe.unet.parameters())
    mix.detach()


def test_route_table_matches_up_to_half_precision_and_repeats_only():
    table = RouteTable(capacity=4)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    near = a[1:].clone()
    near[0, 5] += 0.5  # one token differs
    routes = torch.tensor([[1.0, -1.0], [2.0, 3.0]])
    table.remember(a, routes)
    torch.testing.assert_close(table.lookup(a.half().float()[[1, 0]], 2), routes[[1, 0]])
    torch.testing.assert_close(table.lookup(a[:1].repeat(1, 2, 1), 2), routes[:1])  # a host's longer context
    assert table.misses == 0
    got = table.lookup(torch.cat([b, near]), 2)
    assert torch.equal(got, torch.zeros(2, 2)) and table.misses == 2
    table.remember(a[:1], torch.tensor([[5.0, 5.0]]))  # the same prompt again: the newest wins
    torch.testing.assert_close(table.lookup(a[:1], 2), torch.tensor([[5.0, 5.0]]))
    for _ in range(4):
        table.remember(b, torch.ones(1, 2))
    assert len(table) == 4 and table.lookup(a[:1], 2).abs().sum() == 0  # evicted


def test_router_gate_file_round_trip_and_schema(pipe, lora_set, tmp_path):
    experts = mole.load_experts(lora_set.paths)
    mix = mole.attach(pipe, experts, CFG)
    _randomise(mix)
    path = mole.save_gates(mix, tmp_path / "router.safetensors")
    mix.detach()
    gf = mole.read_gate_file(path)
    assert gf.info["version"] == 3 and gf.info["router"]["feature_dim"] == 32
    tensors, meta = reloads_exactly(pipe, experts, mix, path)

    def broken(edit_tensors=None, edit_info=None) -> str:
        t, info = dict(tensors), json.loads(meta["mole"])
        if edit_tensors:
            edit_tensors(t)
        if edit_info:
            edit_info(info)
        out = tmp_path / "broken.safetensors"
        save_file(t, out, metadata={"format": "pt", "mole": json.dumps(info)})
        with pytest.raises(mole.MoleError) as exc:
            mole.read_gate_file(out)
        assert "\n" not in str(exc.value)
        return str(exc.value)

    assert "router.weight missing" in broken(lambda t: t.pop("router.weight"))
    assert "expected (3, 32)" in broken(lambda t: t.__setitem__("router.weight", torch.zeros(1, 32)))
    assert "`router`" in broken(edit_info=lambda i: i.pop("router"))
    assert "feature_dim` 0" in broken(edit_info=lambda i: next(iter(i["scopes"].values())).update(feature_dim=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mole.read_gate_file(path)  # the router's tensors belong to the file: no "extra tensors" warning


def test_router_needs_a_text_encoder(tiny_sd15, lora_set):
    with pytest.raises(mole.MoleError, match="router.*text encoder"):
        mole.attach({"unet": copy.deepcopy(tiny_sd15["unet"])}, mole.load_experts(lora_set.paths), CFG)


def test_route_table_takes_the_largest_logit_over_a_long_prompts_chunks():
    table = RouteTable()
    g = torch.Generator().manual_seed(2)
    first, second, short = (torch.randn(1, 77, 16, generator=g) for _ in range(3))
    table.remember(torch.cat([first, second]), torch.tensor([[3.0, -1.0], [-2.0, 4.0]]))  # one prompt, 2 chunks
    table.remember(short, torch.tensor([[0.5, 0.5]]))
    long_row = torch.cat([first, second], 1)  # the host concatenates the chunks: (1, 154, D)
    got = table.lookup(torch.cat([long_row, short.repeat(1, 2, 1)]), 2)
    torch.testing.assert_close(got, torch.tensor([[3.0, 4.0], [0.5, 0.5]]))
    assert table.misses == 0


def test_sdxl_unet_finds_routes_in_its_concatenated_conditioning(tiny_sdxl, sdxl_lora):
    """diffusers' SDXL conditioning is both encoders' penultimate states concatenated: the UNet rows match
    the first encoder's remembered penultimate states; the second encoder's scopes run at their prior gates."""
    from tests.fixtures.tiny_models import sdxl_pipeline

    pipe = sdxl_pipeline({k: copy.deepcopy(v) for k, v in tiny_sdxl.items()})
    mix = mole.attach(pipe, mole.load_experts(sdxl_lora.paths), CFG)
    _randomise(mix)
    assert mix.router_lead.startswith("te:")
    seen = []
    handle = pipe.unet.register_forward_hook(lambda *_: seen.append({k: v.clone() for k, v in mix.live_gates.items()}))
    pipe("a purple star", negative_prompt="blurry", num_inference_steps=1, guidance_scale=5.0, height=64, width=64,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    handle.remove()
    assert len(seen) == 1 and mix.routes.misses == 0
    unet_scope = next(s for s in mix.scopes if s.startswith("unet:"))
    rows = seen[0][unet_scope]
    assert rows.shape[0] == 2 and (rows[0] - rows[1]).abs().max() > 1e-3  # uncond and cond routed apart
    for s in (s for s in mix.scopes if s.startswith("te2:")):
        g = mix.scope_gate(s)
        torch.testing.assert_close(seen[0][s], (g.magnitude * torch.sigmoid(g.bias / g.tau)).expand_as(seen[0][s]))
    mix.detach()
