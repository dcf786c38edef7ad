"""Mixture attach/detach, gating, masking, static modes, gradients, balance loss (tiny real nets)."""

from __future__ import annotations

import math

import pytest
import torch

import mole_core as mole
from mole_core.gates import apply_mask
from tests.core._models import TinyNet, naive_mixture, random_expert


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def experts(net):
    return [random_expert(net, r, s, alpha=a) for r, s, a in ((4, 1, 2.0), (8, 2, None), (16, 3, 32.0))]


def _x(b=3, h=8, w=8, seed=5):
    """Random latents with a per-sample offset, so pooled features differ between samples."""
    x = torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))
    return x + torch.linspace(-1, 1, b).reshape(b, 1, 1, 1) * torch.tensor([1.0, -0.5, 0.3, 0.8]).reshape(1, 4, 1, 1)


def _set_random_gates(mix, seed=0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mix.gates.parameters():
            if p.dim() > 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _load_weights(net, weights):
    with torch.no_grad():
        for path, w in weights.items():
            net.get_submodule(path).weight.copy_(w)


def test_detach_restores_outputs_bit_exactly(net, experts):
    x = _x()
    with torch.no_grad():
        base = net(x)
        sd = {k: v.clone() for k, v in net.state_dict().items()}
        mix = mole.attach(net, experts)
        _set_random_gates(mix)
        assert not torch.equal(net(x), base)
        assert list(net.state_dict()) == list(sd)  # module tree / state dict untouched
        mix.detach()
        mix.detach()  # idempotent
        assert torch.equal(net(x), base)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in sd.items())


@pytest.mark.parametrize("weights", [[1.0, 0.0, 0.0], [0.5, 1.0, 0.25], [0.2, -0.4, 0.7]])
def test_static_mode_equals_merged_weights(net, experts, weights):
    x = _x()
    with torch.no_grad():
        mix = mole.attach(net, experts, mode="static", weights=weights)
        got = net(x)
        mix.detach()
        ref_net = TinyNet()
        ref_net.load_state_dict(net.state_dict())
        _load_weights(ref_net, naive_mixture(net, experts, torch.tensor(weights)))
        torch.testing.assert_close(got, ref_net(x), atol=1e-5, rtol=1e-5)


def test_uniform_mode_is_nla_and_strengths_scale(net, experts):
    x = _x()
    with torch.no_grad():
        mix = mole.attach(net, experts, mode="uniform", strength=0.5)
        mix.set_expert_strengths([2.0, 1.0, 0.0])
        got = net(x)
        mix.set_mode("static", [1 / 3 * 0.5 * 2.0, 1 / 3 * 0.5, 0.0])
        mix.strength = 1.0
        mix.set_expert_strengths([1.0, 1.0, 1.0])
        torch.testing.assert_close(net(x), got, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("granularity", ["matrix", "layer", "block", "network"])
@pytest.mark.parametrize("gate_input", ["input", "experts"])
def test_gated_per_sample_and_sums_to_one(net, experts, granularity, gate_input):
    mix = mole.attach(net, experts, mole.GateConfig(granularity=granularity, gate_input=gate_input))
    n_scopes = {"matrix": len(mix.banks), "network": 1}.get(granularity)
    if n_scopes:
        assert len(mix.scopes) == n_scopes
    with torch.no_grad():
        net(_x())  # init: exactly uniform (the NLA starting point)
        for g in mix.live_gates.values():
            torch.testing.assert_close(g, torch.full_like(g, 1 / 3))
        _set_random_gates(mix, std=0.5)
        net(_x())
    for g in mix.live_gates.values():
        assert g.shape == (3, 3)
        torch.testing.assert_close(g.sum(-1), torch.ones(3))
        assert (g[0] - g[1]).abs().max() > 1e-4  # per-sample gates differ
    mix.detach()


def test_masking_equals_renormalised_gates(net, experts):
    x = _x()
    mix = mole.attach(net, experts)
    _set_random_gates(mix, seed=3)
    with torch.no_grad():
        net(x)
        full = {k: v.clone() for k, v in mix.live_gates.items()}
        mix.set_mask([True, False, True])
        masked_out = net(x)
        first = next(iter(mix.scopes))  # later scopes see different inputs once the mixture changes
        for k, g in [(first, mix.live_gates[first])]:
            ref = apply_mask(full[k], torch.tensor([1.0, 0.0, 1.0]))
            torch.testing.assert_close(g, ref)
            assert g[:, 1].abs().max() == 0
            torch.testing.assert_close(g[:, 0] / g[:, 2], full[k][:, 0] / full[k][:, 2])
        # masked expert contributes nothing: same as removing its factors entirely
        mix.detach()
        two = [experts[0], experts[2]]
        mix2 = mole.attach(net, two)
        for i, scope in enumerate(mix2.scopes):
            src = mix.scope_gate(scope)
            dst = mix2.gates[f"s{i}"]
            dst.weight.copy_(src.weight[[0, 2]])
            dst.bias.copy_(src.bias[[0, 2]])
            dst.log_tau.copy_(src.log_tau)
        torch.testing.assert_close(net(x), masked_out, atol=1e-5, rtol=1e-5)
        mix2.detach()


def test_resolution_change_same_gates(net, experts, tmp_path):
    mix = mole.attach(net, experts)
    _set_random_gates(mix)
    with torch.no_grad():
        a = net(_x(2, 8, 8))
        b = net(_x(2, 12, 16))
    assert a.shape[-2:] == (8, 8) and b.shape[-2:] == (12, 16)
    assert torch.isfinite(b).all()


def test_backward_reaches_only_gates(net, experts):
    for p in net.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    expert_before = [{k: (f.down.clone(), f.up.clone()) for k, f in e.factors.items()} for e in experts]
    mix = mole.attach(net, experts, mole.GateConfig(granularity="block"))
    params = mix.gate_parameters()
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss = net(_x()).pow(2).mean() + 0.5 * mix.balance_loss()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in net.parameters())
    opt.step()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    for e, eb in zip(experts, expert_before):
        for k, f in e.factors.items():
            assert torch.equal(f.down, eb[k][0]) and torch.equal(f.up, eb[k][1])
    mix.detach()


def test_balance_loss_matches_hand_computation_and_has_gradient(net, experts):
    mix = mole.attach(net, experts, mole.GateConfig(granularity="block"))
    _set_random_gates(mix, std=0.3)
    net(_x())
    gates = [g.detach() for g in mix.live_gates.values()]
    m, n = len(gates), 3
    q = [sum(float(g[:, i].mean()) for g in gates) / m for i in range(n)]
    hand = -sum(math.log(qi) for qi in q)
    loss = mix.balance_loss()
    assert abs(loss.item() - hand) < 1e-5
    assert loss.item() >= n * math.log(n) - 1e-6  # minimum at uniform use
    loss.backward()
    assert sum(p.grad.abs().sum().item() for p in mix.gate_parameters() if p.grad is not None) > 0
    mix.detach()


@pytest.mark.parametrize("n", [1, 8])
def test_one_and_eight_experts(net, n):
    experts = [random_expert(net, 2 + i, 10 + i) for i in range(n)]
    mix = mole.attach(net, experts)
    _set_random_gates(mix)
    with torch.no_grad():
        y = net(_x())
    assert torch.isfinite(y).all()
    assert all(g.shape[-1] == n for g in mix.live_gates.values())
    mix.detach()


def test_single_expert_equals_weight_merge(net):
    e = random_expert(net, 6, 42, alpha=3.0)
    e.strength = 0.7
    x = _x()
    with torch.no_grad():
        mix = mole.attach(net, [e])
        got = net(x)
        mix.detach()
        ref = TinyNet()
        ref.load_state_dict(net.state_dict())
        _load_weights(ref, naive_mixture(net, [e], torch.tensor([1.0])))
        torch.testing.assert_close(got, ref(x), atol=1e-5, rtol=1e-5)


def test_bake_equals_static_and_restores(net, experts):
    x = _x()
    with torch.no_grad():
        base = net(x)
        mix = mole.attach(net, experts, mode="static", weights=[0.3, 0.5, 0.9])
        static = net(x)
        baked = mole.bake_into_model(mix)
        assert not mix.attached
        torch.testing.assert_close(net(x), static, atol=1e-5, rtol=1e-5)
        baked.restore()
        assert torch.equal(net(x), base)


def test_bake_gated_uses_calibration_stats(net, experts):
    mix = mole.attach(net, experts)
    with pytest.raises(mole.MoleError, match="calibration"):
        mix.merged_deltas()
    _set_random_gates(mix)
    with torch.no_grad():
        net(_x())
    means = mix.stats.mean_gates()
    assert set(means) == set(mix.scopes)
    deltas = mix.merged_deltas()
    assert set(deltas) == set(mix.banks)
    mix.detach()


def test_export_lora_reproduces_static_mixture(net, experts, tmp_path):
    x = _x()
    with torch.no_grad():
        mix = mole.attach(net, experts, mode="static", weights=[0.3, 0.0, 0.9])
        static = net(x)
        path = mole.export_lora(mix, tmp_path / "mix.safetensors")
        mix.detach()
        exported = mole.load_expert(path)
        assert exported.format == "kohya"
        assert max(exported.ranks) == 4 + 16  # zero-weight expert dropped from the concatenation
        mix2 = mole.attach(net, [exported], mode="static", weights=[1.0])
        torch.testing.assert_close(net(x), static, atol=1e-5, rtol=1e-5)
        mix2.detach()


def test_mode_and_mask_errors(net, experts):
    mix = mole.attach(net, experts)
    with pytest.raises(mole.MoleError, match="one value per expert \\(3\\), got 2"):
        mix.set_mode("static", [1.0, 2.0])
    with pytest.raises(mole.MoleError, match="`mode` must be one of"):
        mix.set_mode("fancy")
    with pytest.raises(mole.MoleError, match="keep at least one"):
        mix.set_mask([0, 0, 0])
    mix.detach()


def test_expert_for_other_architecture_is_refused(net):
    from mole_core.expert import Expert, LoraFactor
    other = Expert("flux.safetensors", {"unet:double_blocks.0.img_attn.qkv": LoraFactor(torch.ones(1, 2),
                                                                                      torch.ones(2, 1))})
    with pytest.raises(mole.MoleError, match=r"'flux.safetensors': 0 of 1 LoRA targets match"):
        mole.attach(net, [other])


def test_stats_and_entropy(net, experts):
    mix = mole.attach(net, experts)
    with torch.no_grad():
        mix.stats.bucket = 2
        net(_x())
    s = mix.stats.summary()
    assert s["buckets"] == [2] and abs(s["entropy"] - math.log(3)) < 1e-5
    assert all(abs(sum(v) - 1) < 1e-5 for v in s["mean"].values())
    mix.detach()


def test_training_forward_after_inference_mode_sampling(net, experts):
    """Stats created under inference_mode (a sampling preview) must not break a later training step."""
    mix = mole.attach(net, experts)
    with torch.inference_mode():
        net(_x())
    for p in net.parameters():
        p.requires_grad_(False)
    loss = net(_x()).pow(2).mean() + mix.balance_loss()
    loss.backward()
    assert mix.stats.summary()["samples"] == 2 * 3 * len(mix.scopes)  # 2 passes × 3 samples × scopes
    mix.detach()


def test_stats_recorded_once_under_gradient_checkpointing(net, experts):
    from torch.utils.checkpoint import checkpoint

    mix = mole.attach(net, experts)
    _set_random_gates(mix)
    blocks = net.down_blocks[0].attentions
    originals = [b.forward for b in blocks]
    for b, fwd in zip(blocks, originals):
        b.forward = lambda x, fwd=fwd: checkpoint(fwd, x, use_reentrant=False)
    try:
        for p in net.parameters():
            p.requires_grad_(False)
        net(_x()).pow(2).mean().backward()  # the backward recomputes the checkpointed blocks (and their hooks)
    finally:
        for b, fwd in zip(blocks, originals):
            b.forward = fwd
    assert {int(c) for c in mix.stats._count.values()} == {3}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mix.gate_parameters())
    mix.detach()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e9, "x"])
def test_numbers_are_checked_once_by_the_shared_validator(value):
    from mole_core.checks import check_number, check_numbers

    with pytest.raises(mole.MoleError, match=r"^strength: a (finite )?number"):
        check_number(value, "strength")
    with pytest.raises(mole.MoleError, match=r"^weights\[2\]: "):
        check_numbers([0.5, value], "weights")
    assert check_number("0.25", "x") == 0.25
