"""Gate families: the paper's softmax and the sigmoid × magnitude gates (hand-computed oracles),
text-encoder max pooling, gate-file format 2 and bit-exact loading of format-1 files."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file

import mole_core as mole
from mole_core.gates import rms_normalize
from tests.core._models import TinyNet, random_expert


@pytest.fixture
def net_experts():
    torch.manual_seed(0)
    net = TinyNet().eval()
    return net, [random_expert(net, r, s, name=f"e{s}.safetensors") for r, s in ((4, 1), (8, 2), (4, 3))]


def _randomize(mix, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mix.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)


def _lead_input(net, mix, x):
    """Pooled input of each scope's lead layer, recorded by a plain forward hook."""
    seen = {}

    def keep(name: str):  # noqa: ANN202
        def hook(module, args, out) -> None:  # noqa: ANN001  (returns None: the output stays as it is)
            seen.setdefault(name, args[0].detach().clone())
        return hook

    handles = [mix.index.modules[s.lead].register_forward_hook(keep(name)) for name, s in mix.scopes.items()]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return seen


def _pooled(f: torch.Tensor) -> torch.Tensor:
    """Mean over pixels (conv input) or tokens (linear input): the gate's pooled feature, by hand."""
    return f.mean((2, 3)) if f.dim() == 4 else f.mean(1)


def test_sigmoid_gates_equal_the_hand_computed_formula(net_experts):
    net, experts = net_experts
    cfg = mole.GateConfig(granularity="block", family="sigmoid", m_max=1.5)
    mix = mole.attach(net, experts, cfg)
    _randomize(mix)
    x = torch.randn(3, 4, 8, 8)
    inputs = _lead_input(net, mix, x)
    for name in mix.scopes:
        gate = mix.scope_gate(name)
        pooled = _pooled(inputs[name])
        z = (rms_normalize(pooled) @ gate.weight.T + gate.bias) / gate.log_tau.exp().clamp(cfg.tau_min, cfg.tau_max)
        m = 1.5 / (1 + math.exp(-float(gate.magnitude_logit.detach())))
        want = m / (1 + torch.exp(-z))
        torch.testing.assert_close(mix.live_gates[name], want)
        assert float(mix.live_gates[name].max()) <= 1.5
    mix.detach()


def test_sigmoid_gates_start_at_init_gate_and_are_not_convex(net_experts):
    net, experts = net_experts
    for init, m_max in ((0.5, 2.0), (0.2, 1.0), (1.5, 2.0)):
        mix = mole.attach(net, experts, mole.GateConfig(family="sigmoid", init_gate=init, m_max=m_max))
        with torch.no_grad():
            net(torch.randn(2, 4, 8, 8))
        for g in mix.live_gates.values():
            torch.testing.assert_close(g, torch.full_like(g, init))
        assert not mix.config.convex
        gf = mole.snapshot(mix)
        for prior in gf.prior_gates().values():
            assert prior == pytest.approx([init] * 3, abs=1e-6)
        mix.detach()


def test_softmax_prior_and_default_family_are_unchanged(net_experts):
    net, experts = net_experts
    mix = mole.attach(net, experts)
    _randomize(mix)
    gf = mole.snapshot(mix)
    for s, prior in gf.prior_gates().items():
        bias = gf.tensors[f"gates.{s}.bias"]
        tau = gf.tensors[f"gates.{s}.log_tau"].exp()
        assert prior == pytest.approx(torch.softmax(bias / tau, -1).tolist())
    assert mix.config.family == "softmax" and mix.config.convex
    mix.detach()


def test_masking_zeroes_sigmoid_gates_without_renormalising(net_experts):
    net, experts = net_experts
    # one scope whose lead reads the network input: masking cannot change its features
    mix = mole.attach(net, experts, mole.GateConfig(granularity="network", family="sigmoid"))
    _randomize(mix)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        net(x)
    full = {k: v.clone() for k, v in mix.live_gates.items()}
    mix.set_mask([1, 0, 1])
    with torch.no_grad():
        net(x)
    for k, g in mix.live_gates.items():
        torch.testing.assert_close(g, full[k] * torch.tensor([1.0, 0.0, 1.0]))
    mix.detach()


def test_sigmoid_gated_output_equals_the_merge_of_its_gates(net_experts):
    """Gates above 1 and summing to more than 1: the hooks still equal the merged weights."""
    net, experts = net_experts
    mix = mole.attach(net, experts, mole.GateConfig(granularity="network", family="sigmoid", init_gate=0.9,
                                                    m_max=2.0))
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        gated = net(x)
        per_scope = {s: g[0].tolist() for s, g in mix.live_gates.items()}
        assert sum(next(iter(per_scope.values()))) > 1.5
        baked = mole.bake_into_model(mix, per_scope)
        merged = net(x)
        baked.restore()
    assert (gated - merged).abs().max() <= 1e-5


def test_sigmoid_gate_file_round_trip_is_bit_exact(net_experts, tmp_path):
    net, experts = net_experts
    mix = mole.attach(net, experts, mole.GateConfig(family="sigmoid", m_max=1.25, init_gate=0.3))
    _randomize(mix)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        want = net(x)
    path = mole.save_gates(mix, tmp_path / "sig.safetensors")
    mix.detach()
    gf = mole.read_gate_file(path)
    assert gf.info["version"] == 2 and gf.config.family == "sigmoid" and gf.config.m_max == 1.25
    assert all(f"gates.{s}.magnitude_logit" in gf.tensors for s in gf.scopes)
    mix2 = mole.attach(net, experts, gates=path)
    with torch.no_grad():
        assert torch.equal(net(x), want)
    mix2.detach()


def _as_version_1(gf: mole.GateFile, path) -> None:
    """Write ``gf`` the way format-1 MoLE did: no family/m_max/init_gate/text_pool keys."""
    info = json.loads(json.dumps(gf.info))
    info["version"] = 1
    for key in ("family", "m_max", "init_gate", "text_pool"):
        info["gate_config"].pop(key)
    save_file({k: v.contiguous() for k, v in gf.tensors.items()}, str(path), metadata={"format": "pt",
                                                                                       "mole": json.dumps(info)})


def test_format_1_files_load_bit_exactly_as_softmax_gates(net_experts, tmp_path):
    net, experts = net_experts
    mix = mole.attach(net, experts, mole.GateConfig(granularity="layer"))
    _randomize(mix)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        want = net(x)
    _as_version_1(mole.snapshot(mix), tmp_path / "v1.safetensors")
    mix.detach()
    gf = mole.read_gate_file(tmp_path / "v1.safetensors")
    assert gf.config.family == "softmax" and gf.config.text_pool == "mean" and gf.info["version"] == 1
    mix1 = mole.attach(net, experts, gates=gf)
    with torch.no_grad():
        assert torch.equal(net(x), want)
    mix1.detach()


def test_unknown_family_or_missing_magnitude_is_a_one_line_error(net_experts, tmp_path):
    net, experts = net_experts
    mix = mole.attach(net, experts, mole.GateConfig(family="sigmoid"))
    gf = mole.snapshot(mix)
    mix.detach()
    info = json.loads(json.dumps(gf.info))
    info["gate_config"]["family"] = "gumbel"
    bad = tmp_path / "bad_family.safetensors"
    save_file(gf.tensors, str(bad), metadata={"format": "pt", "mole": json.dumps(info)})
    with pytest.raises(mole.MoleError, match=r"^bad_family.safetensors: gate `family` must be one of") as e:
        mole.read_gate_file(bad)
    assert "\n" not in str(e.value)
    tensors = {k: v for k, v in gf.tensors.items() if not k.endswith("magnitude_logit")}
    missing = tmp_path / "no_mag.safetensors"
    save_file(tensors, str(missing), metadata={"format": "pt", "mole": json.dumps(gf.info)})
    with pytest.raises(mole.MoleError, match=r"magnitude_logit missing"):
        mole.read_gate_file(missing)
    with pytest.raises(mole.MoleError, match="init_gate < m_max"):
        mole.GateConfig(family="sigmoid", init_gate=2.0, m_max=2.0)


def test_text_encoder_max_pool_routes_by_token(tiny_sd15, lora_set):
    """``text_pool="max"``: text-encoder gates read the max over token states, so one token's feature
    shows in the gate (hand-computed from the lead layer's input)."""
    te = copy.deepcopy(tiny_sd15["text_encoder"]).eval()
    experts = mole.load_experts(lora_set.paths)
    if not any("te" in e.components() for e in experts):
        pytest.skip("the LoRA set has no text-encoder parts")
    mix = mole.attach({"te": te}, experts, mole.GateConfig(family="sigmoid", text_pool="max"))
    _randomize(mix)
    ids = torch.randint(0, te.config.vocab_size, (2, 7))
    inputs = _lead_input(lambda i: te(input_ids=i), mix, ids)
    for name in mix.scopes:
        gate = mix.scope_gate(name)
        z = (rms_normalize(inputs[name].amax(1)) @ gate.weight.T + gate.bias) / gate.tau
        torch.testing.assert_close(mix.live_gates[name], gate.magnitude * torch.sigmoid(z))
    mix.detach()


def test_calibrated_centres_are_the_mean_features_and_round_trip(net_experts, tmp_path):
    net, experts = net_experts
    mix = mole.attach(net, experts, mole.GateConfig(family="sigmoid"))
    _randomize(mix)
    batches = [torch.randn(3, 4, 8, 8), torch.randn(2, 4, 8, 8)]
    seen = [_lead_input(net, mix, x) for x in batches]
    assert mix.calibrate_centers(lambda: [net(x) for x in batches]) == len(mix.scopes)
    for name in mix.scopes:
        pooled = torch.cat([_pooled(s[name]) for s in seen])
        torch.testing.assert_close(mix.scope_gate(name).center, pooled.mean(0))
    x = torch.randn(2, 4, 8, 8)
    inputs = _lead_input(net, mix, x)
    for name in mix.scopes:
        gate = mix.scope_gate(name)
        z = (rms_normalize(_pooled(inputs[name]) - gate.center) @ gate.weight.T + gate.bias) / gate.tau
        torch.testing.assert_close(mix.live_gates[name], gate.magnitude * torch.sigmoid(z))
    with torch.no_grad():
        want = net(x)
    path = mole.save_gates(mix, tmp_path / "centred.safetensors")
    mix.detach()
    mix2 = mole.attach(net, experts, gates=path)
    with torch.no_grad():
        assert torch.equal(net(x), want)
    mix2.detach()


def test_token_routing_scores_every_token_and_keeps_the_largest_logit(tiny_sd15, lora_set):
    """Text encoder and UNet (prompt input): ``g = m σ(max_t (W rms(tok_t − c) + b) / τ)``."""
    te = copy.deepcopy(tiny_sd15["text_encoder"]).eval()
    unet = copy.deepcopy(tiny_sd15["unet"]).eval()
    experts = mole.load_experts(lora_set.paths)
    mix = mole.attach({"te": te, "unet": unet}, experts, mole.GateConfig(
        family="sigmoid", gate_input="prompt", token_routing=True, granularity="network"))
    _randomize(mix)
    ids = torch.randint(0, te.config.vocab_size, (2, 7))
    from tests.fixtures.oracle import unet_inputs

    inputs = unet_inputs(unet, batch=2)
    seen = _lead_input(lambda i: te(input_ids=i), mix, ids)
    with torch.no_grad():
        unet(**inputs)

    def hand(name, tokens):
        gate = mix.scope_gate(name)
        z = (rms_normalize(tokens - gate.center) @ gate.weight.T + gate.bias).amax(1) / gate.tau
        return gate.magnitude * torch.sigmoid(z)

    te_scope = next(s for s in mix.scopes if s.startswith("te:"))
    unet_scope = next(s for s in mix.scopes if s.startswith("unet:"))
    torch.testing.assert_close(mix.live_gates[unet_scope], hand(unet_scope, inputs["encoder_hidden_states"]))
    with torch.no_grad():
        te(input_ids=ids)
    torch.testing.assert_close(mix.live_gates[te_scope], hand(te_scope, seen[te_scope]))
    mix.detach()


def test_text_pool_tokens_scores_every_token_of_the_text_encoder_only(tiny_sd15, lora_set):
    """``text_pool="tokens"``: text-encoder gates ``m σ(max_t (W rms(tok_t − c) + b) / τ)``; the UNet's prompt
    gates keep the max-pooled context (token routing on the text encoders alone)."""
    te = copy.deepcopy(tiny_sd15["text_encoder"]).eval()
    unet = copy.deepcopy(tiny_sd15["unet"]).eval()
    experts = mole.load_experts(lora_set.paths)
    mix = mole.attach({"te": te, "unet": unet}, experts, mole.GateConfig(
        family="sigmoid", gate_input="prompt", text_pool="tokens", granularity="network"))
    _randomize(mix)
    ids = torch.randint(0, te.config.vocab_size, (2, 7))
    seen = _lead_input(lambda i: te(input_ids=i), mix, ids)
    te_scope = next(s for s in mix.scopes if s.startswith("te:"))
    gate = mix.scope_gate(te_scope)
    z = (rms_normalize(seen[te_scope] - gate.center) @ gate.weight.T + gate.bias).amax(1) / gate.tau
    torch.testing.assert_close(mix.live_gates[te_scope], gate.magnitude * torch.sigmoid(z))
    from tests.fixtures.oracle import unet_inputs

    inputs = unet_inputs(unet, batch=2)
    with torch.no_grad():
        unet(**inputs)
    unet_scope = next(s for s in mix.scopes if s.startswith("unet:"))
    gate = mix.scope_gate(unet_scope)
    z = (rms_normalize(inputs["encoder_hidden_states"].amax(1) - gate.center) @ gate.weight.T + gate.bias) / gate.tau
    torch.testing.assert_close(mix.live_gates[unet_scope], gate.magnitude * torch.sigmoid(z))
    mix.detach()
