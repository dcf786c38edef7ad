"""``gate_input="prompt"``: UNet gates read the max-pooled prompt conditioning (tiny SD1.5 UNet).

Oracles: the gate computed by hand from the context (softmax((W·rms(max_tokens(ctx)) + b)/τ)), and,
for a batch of one, the UNet with those gates merged into its weights (bake) — the hooks' output must
equal the weight merge.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mole_core as mole
from mole_core.gates import rms_normalize
from tests.core._models import TinyNet, random_expert
from tests.fixtures.oracle import unet_inputs


@pytest.fixture
def unet(tiny_sd15):
    return copy.deepcopy(tiny_sd15["unet"]).eval()


def _prompt_mixture(unet, lora_set, te=None, granularity="block"):
    comps = {"unet": unet, "te": te} if te is not None else {"unet": unet}
    mix = mole.attach(comps, mole.load_experts(lora_set.paths),
                      mole.GateConfig(granularity=granularity, gate_input="prompt"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in mix.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return mix


def _hand_gate(mix, scope: str, context: torch.Tensor) -> torch.Tensor:
    gate = mix.scope_gate(scope)
    feats = rms_normalize(context.amax(1))
    return torch.softmax((feats @ gate.weight.T + gate.bias) / gate.tau, dim=-1)


def test_unet_gates_are_the_hand_computed_gates_of_the_pooled_prompt(unet, lora_set, tiny_sd15):
    mix = _prompt_mixture(unet, lora_set, te=copy.deepcopy(tiny_sd15["text_encoder"]))
    ctx_dim = unet.config.cross_attention_dim
    for s in mix.scopes.values():
        if s.component == "unet":
            assert s.feature_dim == ctx_dim
        else:  # a text encoder has no prompt context: its scopes read their pooled input
            assert s.feature_dim == mix.banks[s.lead].in_dim
    inputs = unet_inputs(unet, batch=3)
    with torch.no_grad():
        unet(**inputs)
    unet_scopes = [s for s in mix.scopes if s.startswith("unet:")]
    assert len(unet_scopes) > 3
    for s in unet_scopes:
        torch.testing.assert_close(mix.live_gates[s], _hand_gate(mix, s, inputs["encoder_hidden_states"]))
    mix.detach()


def test_gates_follow_the_prompt_not_the_latents_or_timestep(unet, lora_set):
    mix = _prompt_mixture(unet, lora_set)
    a, b = unet_inputs(unet, batch=2, seed=0), unet_inputs(unet, batch=2, seed=1)

    def gates(**inputs):
        with torch.no_grad():
            unet(**inputs)
        return {k: v.clone() for k, v in mix.live_gates.items()}

    ref = gates(**a)
    other_latents = gates(sample=b["sample"], timestep=b["timestep"], encoder_hidden_states=a["encoder_hidden_states"])
    other_prompt = gates(sample=a["sample"], timestep=a["timestep"], encoder_hidden_states=b["encoder_hidden_states"])
    for k in ref:
        assert torch.equal(ref[k], other_latents[k]), k
    diffs = {k: float((ref[k] - other_prompt[k]).abs().max()) for k in ref}
    assert min(diffs.values()) > 0 and max(diffs.values()) > 0.05, diffs
    # positional context (unet(sample, t, ctx)) is captured like the keyword
    with torch.no_grad():
        unet(a["sample"], a["timestep"], a["encoder_hidden_states"])
    for k in ref:
        torch.testing.assert_close(mix.live_gates[k], ref[k])
    # repeating the context to a longer token length (ComfyUI's rule for long prompts) keeps the gates
    long = {**a, "encoder_hidden_states": a["encoder_hidden_states"].repeat(1, 2, 1)}
    for k, v in gates(**long).items():
        torch.testing.assert_close(v, ref[k])
    mix.detach()


def test_gated_output_equals_the_weight_merge_of_its_prompt_gates(unet, lora_set):
    mix = _prompt_mixture(unet, lora_set)
    inputs = unet_inputs(unet, batch=1, seed=4)
    with torch.no_grad():
        gated = unet(**inputs).sample
        per_scope = {s: _hand_gate(mix, s, inputs["encoder_hidden_states"])[0].tolist() for s in mix.scopes}
        baked = mole.bake_into_model(mix, per_scope)
        merged = unet(**inputs).sample
        baked.restore()
        plain = unet(**inputs).sample
    assert (gated - merged).abs().max() <= 1e-5
    assert (gated - plain).abs().max() > 1e-3  # the experts do change the output


def test_gate_file_round_trip_keeps_prompt_input(unet, lora_set, tiny_sd15, tmp_path):
    mix = _prompt_mixture(unet, lora_set)
    inputs = unet_inputs(unet, batch=2)
    with torch.no_grad():
        want = unet(**inputs).sample
    path = mole.save_gates(mix, tmp_path / "prompt_gates.safetensors")
    mix.detach()
    mix2 = mole.attach({"unet": unet}, mole.load_experts(lora_set.paths), gates=path)
    assert mix2.config.gate_input == "prompt"
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, want)
    mix2.detach()
    other = mole.attach({"unet": unet}, mole.load_experts(lora_set.paths), mole.GateConfig(gate_input="input"))
    with pytest.raises(mole.MoleError, match="gate_input"):
        mole.apply_gate_file(other, mole.read_gate_file(path))
    other.detach()


def test_prompt_input_needs_cross_attention_and_context():
    net = TinyNet().eval()
    experts = [random_expert(net, 4, s) for s in (1, 2)]
    with pytest.raises(mole.MoleError, match=r"gate_input 'prompt' needs a UNet with cross-attention"):
        mole.attach(net, experts, mole.GateConfig(gate_input="prompt"))


def test_unet_call_without_context_is_a_clear_error(unet, lora_set):
    mix = _prompt_mixture(unet, lora_set)
    inputs = unet_inputs(unet, batch=1)
    with torch.no_grad(), pytest.raises(mole.MoleError, match="without prompt conditioning"):
        unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=None)
    mix.detach()


def test_sdxl_unet_gates_read_its_concatenated_context(tiny_sdxl, sdxl_lora):
    """SDXL's context is CLIP-L and CLIP-G side by side: the gates take its whole width."""
    unet = copy.deepcopy(tiny_sdxl["unet"]).eval()
    experts = mole.load_experts([sdxl_lora[0].path, sdxl_lora[1].path])
    mix = mole.attach({"unet": unet}, experts, mole.GateConfig(gate_input="prompt", init_std=0.5))
    assert {s.feature_dim for s in mix.scopes.values()} == {unet.config.cross_attention_dim}
    inputs = unet_inputs(unet, batch=2)
    with torch.no_grad():
        out = unet(**inputs).sample
    assert torch.isfinite(out).all()
    for s in mix.scopes:
        torch.testing.assert_close(mix.live_gates[s], _hand_gate(mix, s, inputs["encoder_hidden_states"]))
    mix.detach()
