"""Per-set scales of trigger gates (gate file version 6): each LoRA's factor under an on-pattern of the LoRAs.

Oracles: the multilinear factor ``1 + Σ_k w_k (scale_k − 1)``, ``w_k = Π_j (p_j or 1 − p_j)``, by hand; the gates
of a real diffusers text encoder + UNet against ``m σ(logit/τ) · factor`` computed from the router's own logits;
the round trip bit for bit; every malformed table a one-line error.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import mole_core as mole
from mole_core.gates import ScopeGate, set_factors
from tests.core._files import refusal, reloads_exactly
from tests.core.test_trigger import calibrated_mixture, token_ids
from tests.fixtures.tiny_models import sd15_pipeline

SETS = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
SCALE = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.5]])


@pytest.fixture
def pipe(tiny_sd15):
    return sd15_pipeline({k: copy.deepcopy(v) for k, v in tiny_sd15.items()})


def test_set_factors_equal_the_hand_computed_mixture_of_patterns():
    on = torch.tensor([[0.9, 0.2, 0.7], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    w1, w2 = 0.9 * 0.2 * 0.3, 0.9 * 0.8 * 0.7  # exactly {0, 1} on; exactly {0, 2} on
    want = torch.tensor([[1 - w1, 1.0, 1 - 0.5 * w2], [1.0, 1.0, 0.5], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(set_factors(on, SETS, SCALE), want)


def _with_table(mix: mole.Mixture) -> list[str]:
    unet = [s for s in mix.scopes if s.startswith("unet:")][:3]
    for s in unet:
        mix.scope_gate(s).set_set_scales(SETS, SCALE)
    return unet


def test_gates_with_per_set_scales_by_hand(pipe, lora_set):
    mix = calibrated_mixture(pipe, lora_set)
    tabled = _with_table(mix)
    router = mix.gates["router"]
    prompts = ["a purple star on grey", "a purple circle", "a blue square"]
    ids = token_ids(pipe, prompts)
    with torch.no_grad():
        ctx = pipe.text_encoder(ids)[0]
        pipe.unet(torch.randn(3, 4, 8, 8), torch.tensor([500] * 3), encoder_hidden_states=ctx)
        logits = router(next(m for n, m in pipe.text_encoder.named_modules()
                             if n.endswith("token_embedding"))(ids))
    for name in mix.scopes:
        g = mix.scope_gate(name)
        p = torch.sigmoid(logits / g.tau)
        want = g.magnitude * p * (set_factors(p, SETS, SCALE) if name in tabled else 1)
        torch.testing.assert_close(mix.live_gates[name], want)
    factor = mix.live_gates[tabled[0]][0, 2] / mix.scope_gate(tabled[0]).magnitude[2]
    # "purple star": purple and star on (p ≈ 1), the keyless expert 1 at p = σ(0) = ½, so pattern {0, 2} has
    # weight ≈ ½ and star's factor is ≈ 1 − ½ · (1 − 0.5) = 0.75
    assert float(factor.detach()) == pytest.approx(0.75, abs=0.02)
    mix.detach()


def test_per_set_scales_round_trip_as_version_6_and_malformed_tables_are_one_line_errors(pipe, lora_set, tmp_path):
    experts = mole.load_experts(lora_set.paths)
    mix = calibrated_mixture(pipe, lora_set)
    v4 = mole.save_gates(mix, tmp_path / "v4.safetensors")
    tabled = _with_table(mix)
    path = mole.save_gates(mix, tmp_path / "sets.safetensors")
    mix.detach()
    gf = mole.read_gate_file(path)
    assert gf.info["version"] == 6
    assert {k.rsplit(".", 1)[0] for k in gf.tensors if k.endswith(".sets")} == {f"gates.{s}" for s in tabled}
    tensors, meta = reloads_exactly(pipe, experts, mix, path)
    mix2 = mole.attach(pipe, experts, gates=path)
    assert torch.equal(mix2.scope_gate(tabled[0]).set_scale, SCALE)
    assert mole.read_gate_file(v4).info["version"] == 4
    mole.load_gates(mix2, v4)
    assert all(mix2.scope_gate(s).sets.shape == (0, 3) for s in mix2.scopes)  # a version-4 file clears the table
    mix2.detach()

    def broken(edit) -> str:  # noqa: ANN001
        return refusal(tensors, meta, edit, tmp_path / "broken.safetensors")

    key = f"gates.{tabled[0]}"
    assert "needs both" in broken(lambda t: t.pop(f"{key}.set_scale"))
    assert "only 0 and 1" in broken(lambda t: t.__setitem__(f"{key}.sets", SETS * 0.5))
    assert "repeats an on-pattern" in broken(lambda t: t.__setitem__(f"{key}.sets", SETS[[0, 0]]))
    assert "must be ≥ 0" in broken(lambda t: t.__setitem__(f"{key}.set_scale", -SCALE))
    assert "expected (2, 3)" in broken(lambda t: t.__setitem__(f"{key}.set_scale", SCALE[:, :2].contiguous()))
    info = json.loads(meta["mole"])
    assert info["version"] == 6


def test_set_scales_need_trigger_gates_and_matching_shapes(pipe, lora_set):
    mix = calibrated_mixture(pipe, lora_set)
    gate = mix.scope_gate(next(iter(mix.scopes)))
    with pytest.raises(mole.MoleError, match=r"must both be \(K, 3\)"):
        gate.set_set_scales(SETS, SCALE[:1])
    mix.detach()
    with pytest.raises(mole.MoleError, match="need gate_input trigger"):
        ScopeGate(4, 3, mole.GateConfig(family="sigmoid")).set_set_scales(SETS, SCALE)
