"""``gate_input="trigger"``: each LoRA switches on when the word its file is named after is in the prompt; every
scope only scales each LoRA.

Oracles: the token-embedding table itself (the centre is the mean of the distinct tokens' rows, a key the
trigger's row minus it, normalised), the logit ``scale · max_t cos(e_t − c, k) + bias`` and the gate
``m_i σ(logit / τ)`` by hand, and a real diffusers text encoder + UNet.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import mole_core as mole
from mole_core.gate_file import VERSION
from tests.core._files import refusal, reloads_exactly
from tests.fixtures.tiny_models import sd15_pipeline
from train.config import TrainConfig

CFG = mole.GateConfig(gate_input="trigger", family="sigmoid", granularity="block")
TRIGGERS = ["purple", None, "star"]
PROMPTS = ["a purple circle", "a red star on grey", "a blue square"]


@pytest.fixture
def pipe(tiny_sd15):
    return sd15_pipeline({k: copy.deepcopy(v) for k, v in tiny_sd15.items()})


def token_ids(pipe, prompts: list[str]) -> torch.Tensor:
    return pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids


def _encode(pipe):
    def run(prompts: list[str]) -> torch.Tensor:
        return pipe.text_encoder(token_ids(pipe, prompts))[0]
    return run


def _table(pipe) -> torch.Tensor:
    return next(m for n, m in pipe.text_encoder.named_modules() if n.endswith("token_embedding")).weight.detach()


def calibrated_mixture(pipe, lora_set) -> mole.Mixture:
    mix = mole.attach(pipe, mole.load_experts(lora_set.paths), CFG)
    mole.calibrate_triggers(mix, _encode(pipe), PROMPTS, TRIGGERS)
    return mix


def test_keys_and_centre_come_from_the_token_embedding_table(pipe, lora_set):
    mix = calibrated_mixture(pipe, lora_set)
    router, table = mix.gates["router"], _table(pipe)
    assert mix.router_lead == "te:token_embedding" and all(s.feature_dim == 0 for s in mix.scopes.values())
    distinct = torch.unique(torch.cat([token_ids(pipe, sorted(set(PROMPTS) | {"purple", "star"})).flatten()]))
    centre = table[distinct].mean(0)
    torch.testing.assert_close(router.center, centre)
    for i, word in enumerate(TRIGGERS):
        if word is None:
            assert router.weight[i].abs().sum() == 0 and router.bias[i] == 0  # no key: its bias alone decides
            continue
        (tid,) = pipe.tokenizer(word, add_special_tokens=False).input_ids
        torch.testing.assert_close(router.weight[i], F.normalize(table[tid] - centre, dim=0))
        torch.testing.assert_close(router.bias[i], -router.scale[i] * 0.5)  # on above cosine 0.5
    mix.detach()


def test_gates_by_hand_in_the_text_encoder_and_the_unet(pipe, lora_set):
    mix = calibrated_mixture(pipe, lora_set)
    router, table = mix.gates["router"], _table(pipe)
    with torch.no_grad():
        router.scale.copy_(torch.tensor([12.0, 3.0, 8.0]))
        router.bias.add_(torch.tensor([0.5, -1.0, 0.25]))
        for i, name in enumerate(mix.scopes):
            mix.scope_gate(name).magnitude_logit.copy_(torch.tensor([0.3, -0.2, 1.0]) * (i + 1) / len(mix.scopes))
    prompts = ["a purple circle on grey", "a red star", "a blue square"]
    ids = token_ids(pipe, prompts)
    cos = F.normalize(table[ids] - router.center, dim=-1) @ router.weight.T  # (B, L, N) by hand
    logits = cos.amax(1) * router.scale + router.bias
    named = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    assert (logits[:, [0, 2]][named[:, [0, 2]]] > 3).all() and (logits[:, [0, 2]][~named[:, [0, 2]]] < -1).all()
    with torch.no_grad():
        ctx = pipe.text_encoder(ids)[0]
        pipe.unet(torch.randn(3, 4, 8, 8), torch.tensor([500] * 3), encoder_hidden_states=ctx.flip(0))
    assert mix.routes.misses == 0
    for name in mix.scopes:
        g = mix.scope_gate(name)
        assert g.magnitude.shape == (3,) and not g.bias.requires_grad and not g.log_tau.requires_grad
        rows = logits.flip(0) if name.startswith("unet:") else logits
        torch.testing.assert_close(mix.live_gates[name], g.magnitude * torch.sigmoid(rows / g.tau))
    mix.detach()


def test_only_magnitudes_and_the_routers_threshold_train(pipe, lora_set):
    mix = calibrated_mixture(pipe, lora_set)
    trained = {id(p) for p in mix.gate_parameters()}
    router = mix.gates["router"]
    assert id(router.scale) in trained and id(router.bias) in trained
    assert id(router.weight) not in {id(p) for p in mix.gates.parameters()}  # the keys are fixed
    for name in mix.scopes:
        g = mix.scope_gate(name)
        assert id(g.magnitude_logit) in trained and id(g.bias) not in trained and id(g.log_tau) not in trained
    ctx = pipe.text_encoder(token_ids(pipe, ["a purple star"]))[0]
    out = pipe.unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), encoder_hidden_states=ctx).sample
    mix.gates.zero_grad(set_to_none=True)
    out.pow(2).mean().backward()
    assert float(router.scale.grad.abs().sum()) > 0 and float(router.bias.grad.abs().sum()) > 0
    assert all(p.grad is None for p in pipe.unet.parameters())
    mix.detach()


def test_trigger_gate_file_round_trip_and_schema(pipe, lora_set, tmp_path):
    experts = mole.load_experts(lora_set.paths)
    mix = calibrated_mixture(pipe, lora_set)
    with torch.no_grad():
        for i, name in enumerate(mix.scopes):
            mix.scope_gate(name).magnitude_logit.copy_(torch.tensor([0.1, 0.2, 0.3]) * i)
    path = mole.save_gates(mix, tmp_path / "trigger.safetensors")
    mix.detach()
    gf = mole.read_gate_file(path)
    assert gf.info["version"] == 4 and gf.config.gate_input == "trigger"
    tensors, meta = reloads_exactly(pipe, experts, mix, path)

    def broken(edit) -> str:  # noqa: ANN001
        return refusal(tensors, meta, edit, tmp_path / "broken.safetensors")

    scope = next(iter(gf.scopes))
    assert "router.scale missing" in broken(lambda t: t.pop("router.scale"))
    assert "expected (3,)" in broken(lambda t: t.__setitem__("router.bias", torch.zeros(())))
    assert "expected (3,)" in broken(lambda t: t.__setitem__(f"gates.{scope}.magnitude_logit", torch.zeros(())))
    info = json.loads(meta["mole"])
    info["version"] = VERSION + 1  # a file from a newer MoLE
    out = tmp_path / "newer.safetensors"
    save_file(tensors, out, metadata={**meta, "mole": json.dumps(info)})
    with pytest.raises(mole.MoleError, match="newer than this MoLE"):
        mole.read_gate_file(out)


def test_trigger_errors_are_one_line():
    with pytest.raises(mole.MoleError, match="trigger' needs the sigmoid gate family"):
        mole.GateConfig(gate_input="trigger")
    with pytest.raises(mole.MoleError, match="needs `train_text_gates`"):
        TrainConfig(gate_input="trigger", gate_family="sigmoid")


def test_calibration_refuses_a_wrong_trigger_list(pipe, lora_set):
    mix = mole.attach(pipe, mole.load_experts(lora_set.paths), CFG)
    try:
        with pytest.raises(mole.MoleError, match="one trigger word .* per expert"):
            mole.calibrate_triggers(mix, _encode(pipe), PROMPTS, ["purple"])
        with pytest.raises(mole.MoleError, match="no expert has a trigger word"):
            mole.calibrate_triggers(mix, _encode(pipe), PROMPTS, [None, None, None])
    finally:
        mix.detach()
    assert mole.trigger_words(mole.load_experts(lora_set.paths), ["EXPERT0_kohya", "x"])[0] == "EXPERT0_kohya"
