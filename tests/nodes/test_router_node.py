"""Router gate files (``gate_input="router"``) in MoLE Apply: the router runs in ComfyUI's CLIP encode, the UNet
finds each prompt's decision by its conditioning — through ComfyUI's own CLIPTextEncode path and sampler (CFG
batches cond and uncond in one call).

Oracle: the sigmoid gate ``m σ((ℓ + b)/τ)`` computed by hand from the router logits the text encoder produced
for each prompt.
"""

from __future__ import annotations

import pytest
import torch

from tests.nodes._helpers import sample
from tests.nodes._nodes import apply, load_gates

pytestmark = pytest.mark.comfy


def _router_gates(mole, tiny, experts, folder, name="router.safetensors"):
    import mole_core

    model, clip = tiny
    index, _ = mole.comfy_index.build_index(model=model, clip=clip)
    cfg = mole_core.GateConfig(gate_input="router", family="sigmoid", granularity="block", init_std=1.0)
    mix = mole_core.attach(index, experts.experts(), cfg, hooks=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, p in mix.gates.named_parameters():
            if key.endswith(("bias", "weight")):
                p.copy_(torch.randn(p.shape, generator=gen))
    mole_core.save_gates(mix, folder / name)
    return load_gates(mole, name)


def _encode(clip, text: str):
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _trigger_gates(mole, tiny, experts, folder, name, edit=None, **cfg):
    """A trigger gate file calibrated on ComfyUI's own CLIP (purple and star keyed), loaded as MoLE Load Gates does
    (``edit(mix)`` changes the mixture before it is saved)."""
    import mole_core

    model, clip = tiny
    index, _ = mole.comfy_index.build_index(model=model, clip=clip)
    config = mole_core.GateConfig(gate_input="trigger", family="sigmoid", granularity="block", **cfg)
    mix = mole_core.attach(index, experts.experts(), config, hooks=False)
    mole_core.calibrate_triggers(mix, lambda ps: [_encode(clip, p) for p in ps],
                                 ["a purple star on grey", "a red circle", "blurry"], ["purple", "star"])
    if edit is not None:
        edit(mix)
    mole_core.save_gates(mix, folder / name)
    return load_gates(mole, name)


def _unet_gates_while_sampling(m, unet_mix, pos, neg, steps: int = 1) -> list[dict]:
    """Each UNet call's live gates during a ComfyUI sampling run (MoLE Apply ejects them after it)."""
    seen: list[dict] = []
    handle = m.model.diffusion_model.register_forward_hook(
        lambda *_: seen.append({k: v.clone() for k, v in unet_mix.live_gates.items()}))
    sample(m, pos, neg, steps=steps)
    handle.remove()
    return seen


def test_router_gate_file_routes_cond_and_uncond_rows_by_their_prompt(mole, tiny, experts, comfy_dirs):
    import mole_core

    gates = _router_gates(mole, tiny, experts, comfy_dirs["mole_gates"])
    model, clip = tiny
    m, c, g = apply(mole, model, experts, "gated", clip=clip, gates=gates)
    unet_mix, te_mix = (next(h.mix for h in g.holders if h.component == comp) for comp in ("unet", "te"))
    assert unet_mix.routes is te_mix.routes and te_mix.router_lead is not None and unet_mix.router_lead is None
    pos = _encode(c, "a purple star on grey")
    want_pos = te_mix._route.clone()
    neg = _encode(c, "blurry")
    want_neg = te_mix._route.clone()
    assert (want_pos - want_neg).abs().max() > 0.02  # the two prompts route apart (random router, tiny CLIP)
    seen: list[dict] = []  # each UNet call's gates (ComfyUI ejects the mixture after sampling: live gates go)
    handle = m.model.diffusion_model.register_forward_hook(
        lambda *_: seen.append({k: v.clone() for k, v in unet_mix.live_gates.items()}))
    sample(m, pos, neg, steps=2)
    assert unet_mix.routes.misses == 0 and len(seen) == 2
    scopes = [s for s in unet_mix.scopes if s.startswith("unet:")]
    for s in scopes:
        gate = unet_mix.scope_gate(s).requires_grad_(False)
        rows = seen[-1][s]
        expect = [gate.magnitude * torch.sigmoid((r[0] + gate.bias) / gate.tau) for r in (want_pos, want_neg)]
        assert rows.shape[0] == 2
        for e in expect:  # ComfyUI orders cond/uncond itself: each prompt's gates in one row
            assert min(float((row - e).abs().max()) for row in rows) < 1e-5, s
    # conditioning from a CLIP without MoLE matches no routed prompt: every scope runs at its prior gate
    with pytest.warns(mole_core.MoleWarning, match="conditioning of no prompt the text encoder routed"):
        sample(m, _encode(clip, "a purple star on grey"), neg, steps=1)
    handle.remove()
    assert unet_mix.routes.misses > 0
    gate = unet_mix.scope_gate(scopes[0]).requires_grad_(False)
    prior = gate.magnitude * torch.sigmoid(gate.bias / gate.tau)
    assert min(float((row - prior).abs().max()) for row in seen[-1][scopes[0]]) < 1e-5


def test_router_gate_file_needs_the_clip(mole, tiny, experts, comfy_dirs):
    import mole_core

    gates = _router_gates(mole, tiny, experts, comfy_dirs["mole_gates"], "router_noclip.safetensors")
    with pytest.raises(mole_core.MoleError, match="router.*text encoder"):
        apply(mole, tiny[0], experts, "gated", gates=gates)


def test_trigger_gate_file_switches_each_lora_by_its_word_in_comfyuis_clip(mole, tiny, experts, comfy_dirs):
    """``gate_input="trigger"``: keys calibrated on ComfyUI's own token embedding; the prompt that names a
    LoRA's word runs it, the prompt that does not switches it off, in the text encoder and the UNet."""
    model, clip = tiny
    gates = _trigger_gates(mole, tiny, experts, comfy_dirs["mole_gates"], "trigger.safetensors")
    m, c, g = apply(mole, model, experts, "gated", clip=clip, gates=gates)
    unet_mix, te_mix = (next(h.mix for h in g.holders if h.component == comp) for comp in ("unet", "te"))
    assert te_mix.router_lead == "te:token_embedding" and unet_mix.routes is te_mix.routes
    pos = _encode(c, "a purple circle on grey")
    want_pos = te_mix._route.clone()
    neg = _encode(c, "a star")
    want_neg = te_mix._route.clone()
    assert want_pos[0, 0] > 2 and want_pos[0, 1] < -2  # names purple, not star
    assert want_neg[0, 0] < -2 and want_neg[0, 1] > 2  # names star, not purple
    seen = _unet_gates_while_sampling(m, unet_mix, pos, neg)
    assert unet_mix.routes.misses == 0 and len(seen) == 1
    for s in (s for s in unet_mix.scopes if s.startswith("unet:")):
        gate = unet_mix.scope_gate(s).requires_grad_(False)
        rows = seen[-1][s]
        for r in (want_pos, want_neg):
            e = gate.magnitude * torch.sigmoid(r[0] / gate.tau)
            assert min(float((row - e).abs().max()) for row in rows) < 1e-5, s


def test_positive_negative_routing_runs_the_prompts_loras_in_both_cfg_rows(mole, tiny, experts, comfy_dirs):
    """``negative_routing="positive"`` in a trigger gate file: ComfyUI batches cond and uncond (its
    ``cond_or_uncond`` says which is which); the uncond row runs at the prompt's gates, not the negative
    prompt's, in every UNet scope."""
    model, clip = tiny
    gates = _trigger_gates(mole, tiny, experts, comfy_dirs["mole_gates"], "trigger_positive.safetensors",
                           negative_routing="positive")
    m, c, g = apply(mole, model, experts, "gated", clip=clip, gates=gates)
    unet_mix, te_mix = (next(h.mix for h in g.holders if h.component == comp) for comp in ("unet", "te"))
    pos = _encode(c, "a purple circle on grey")
    want_pos = te_mix._route.clone()
    neg = _encode(c, "a star")
    assert want_pos[0, 0] > 2 and te_mix._route[0, 1] > 2  # the prompt names purple, the negative star
    seen = _unet_gates_while_sampling(m, unet_mix, pos, neg)
    assert unet_mix.routes.misses == 0 and len(seen) == 1
    for s in (s for s in unet_mix.scopes if s.startswith("unet:")):
        gate = unet_mix.scope_gate(s).requires_grad_(False)
        rows = seen[-1][s]
        assert rows.shape[0] == 2, s
        torch.testing.assert_close(rows, (gate.magnitude * torch.sigmoid(want_pos[0] / gate.tau)).expand(2, -1))


SETS, SET_SCALE = torch.tensor([[1.0, 1.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.5]])


def test_per_set_scales_of_a_trigger_gate_file_apply_in_comfyui(mole, tiny, experts, comfy_dirs):
    """A version-6 trigger file (per-set scales in the UNet's scopes, as ``--search-by-set`` writes them): in
    ComfyUI's sampler each row's gate is ``m σ(ℓ/τ)`` times the factor of its prompt's on-pattern — star off when
    the prompt names purple and star, at half when it names star alone — from the routes ComfyUI's CLIP gave."""
    from mole_core.gates import set_factors

    def tables(mix) -> None:  # noqa: ANN001
        for s in mix.scopes:
            if s.startswith("unet:"):
                mix.scope_gate(s).set_set_scales(SETS, SET_SCALE)

    model, clip = tiny
    gates = _trigger_gates(mole, tiny, experts, comfy_dirs["mole_gates"], "trigger_sets.safetensors", tables)
    assert gates.gate_file.info["version"] == 6
    m, c, g = apply(mole, model, experts, "gated", clip=clip, gates=gates)
    unet_mix, te_mix = (next(h.mix for h in g.holders if h.component == comp) for comp in ("unet", "te"))
    pos = _encode(c, "a purple star on grey")
    want_pos = te_mix._route.clone()
    neg = _encode(c, "a star")
    want_neg = te_mix._route.clone()
    assert (want_pos[0] > 2).all() and want_neg[0, 0] < -2 < want_neg[0, 1]
    seen = _unet_gates_while_sampling(m, unet_mix, pos, neg)
    assert unet_mix.routes.misses == 0 and len(seen) == 1
    for s in (s for s in unet_mix.scopes if s.startswith("unet:")):
        gate = unet_mix.scope_gate(s).requires_grad_(False)
        rows = seen[-1][s]
        for r, star in ((want_pos, 0.0), (want_neg, 0.5)):
            p = torch.sigmoid(r[0] / gate.tau)
            e = gate.magnitude * p * set_factors(p[None], SETS, SET_SCALE)[0]
            assert float(e[1] / gate.magnitude[1]) == pytest.approx(star, abs=0.02), s
            assert min(float((row - e).abs().max()) for row in rows) < 1e-5, s


def test_per_set_scales_in_the_text_encoder_scopes_apply_in_comfyuis_clip(mole, tiny, experts, comfy_dirs):
    """A version-6 trigger file with per-set scales in the text encoder's scopes (as ``--search-text-by-set``
    writes them): during ComfyUI's CLIP encode each text-encoder scope's gate is ``m σ(ℓ/τ)`` times the factor of
    the prompt's on-pattern, from the routes that same encode computed."""
    from mole_core.gates import set_factors

    def tables(mix) -> None:  # noqa: ANN001
        for s in mix.scopes:
            if not s.startswith("unet:"):
                mix.scope_gate(s).set_set_scales(SETS, SET_SCALE)

    model, clip = tiny
    gates = _trigger_gates(mole, tiny, experts, comfy_dirs["mole_gates"], "trigger_te_sets.safetensors", tables)
    assert gates.gate_file.info["version"] == 6
    m, c, g = apply(mole, model, experts, "gated", clip=clip, gates=gates)
    te_mix = next(h.mix for h in g.holders if h.component == "te")
    te_scopes = [s for s in te_mix.scopes if not s.startswith("unet:")]
    seen: dict[str, torch.Tensor] = {}
    hooks = [te_mix.scope_gate(s).register_forward_hook(lambda mod, args, out, s=s: seen.__setitem__(s, out.clone()))
             for s in te_scopes]
    try:
        for text, star in (("a purple star on grey", 0.0), ("a star", 0.5)):
            seen.clear()
            _encode(c, text)
            route = te_mix._route.clone()
            assert te_scopes and set(seen) == set(te_scopes), text
            for s in te_scopes:
                gate = te_mix.scope_gate(s).requires_grad_(False)
                p = torch.sigmoid(route[0] / gate.tau)
                want = gate.magnitude * p * set_factors(p[None], SETS, SET_SCALE)[0]
                assert float(want[1] / (gate.magnitude[1] * p[1])) == pytest.approx(star, abs=0.02), (text, s)
                torch.testing.assert_close(seen[s].reshape(-1, 2)[0], want, atol=1e-5, rtol=1e-5)
    finally:
        for h in hooks:
            h.remove()
