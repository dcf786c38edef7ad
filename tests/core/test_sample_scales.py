"""Per-sample gate factors (:meth:`Mixture.sample_scales`): one batch scores several gate settings at once.

Oracle: the same rows run one setting at a time, with the setting written into the gates' own magnitudes (a real
diffusers text encoder + UNet with trigger gates); every malformed call a one-line error.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mole_core as mole
from tests.core.test_trigger import calibrated_mixture, token_ids
from tests.fixtures.tiny_models import sd15_pipeline

PROMPTS = ["a purple star on grey", "a blue square"]


@pytest.fixture
def pipe(tiny_sd15):
    return sd15_pipeline({k: copy.deepcopy(v) for k, v in tiny_sd15.items()})


def _unet(pipe, mix: mole.Mixture, x: torch.Tensor) -> torch.Tensor:
    """The UNet on ``[negative; positive]`` rows of PROMPTS (classifier-free guidance's layout)."""
    with torch.no_grad():
        ctx = pipe.text_encoder(token_ids(pipe, [""] * len(PROMPTS) + PROMPTS))[0]
        mix.clear_live_gates()
        return pipe.unet(x, torch.tensor([500] * len(x)), encoder_hidden_states=ctx).sample


def _magnitudes_times(mix: mole.Mixture, factors: torch.Tensor) -> None:
    """Write ``magnitude × factor`` into every scope's magnitude logit (the oracle's way to set a variant)."""
    with torch.no_grad():
        for i, name in enumerate(mix.scope_names):
            gate = mix.scope_gate(name)
            target = gate.magnitude * factors[i]
            gate.magnitude_logit.copy_(torch.log(target / (gate.m_max - target)))


def test_each_row_runs_its_own_variant_as_if_written_into_the_magnitudes(pipe, lora_set):
    mix = calibrated_mixture(pipe, lora_set)
    s, n = len(mix.scope_names), mix.n
    unet_rows = [i for i, name in enumerate(mix.scope_names) if name.startswith("unet:")]
    factors = torch.ones(3, s, n)
    factors[1, unet_rows, 0] = 0.25  # variant 1: expert 0 at a quarter in the UNet
    factors[2, unet_rows[: len(unet_rows) // 2], 2] = 1.5  # variant 2: expert 2 stronger in the first half
    x = torch.randn(2 * len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    variant = torch.tensor([2, 1])  # prompt 0 runs variant 2, prompt 1 variant 1 (both halves of the batch)
    with mix.sample_scales(factors, variant):
        got = _unet(pipe, mix, x)
    saved = {k: v.clone() for k, v in mix.gates.state_dict().items()}
    for v in (1, 2):
        _magnitudes_times(mix, factors[v])
        want = _unet(pipe, mix, x)
        rows = [r for r in range(len(x)) if variant[r % len(PROMPTS)] == v]
        torch.testing.assert_close(got[rows], want[rows], atol=1e-5, rtol=1e-4)
        mix.gates.load_state_dict(saved)
    plain = _unet(pipe, mix, x)
    assert (plain - got).abs().amax() > 1e-3  # the variants changed the output; outside the block nothing does
    with mix.sample_scales(torch.ones(1, s, n), torch.zeros(len(PROMPTS), dtype=torch.long)):
        torch.testing.assert_close(_unet(pipe, mix, x), plain, atol=1e-6, rtol=0)
    mix.detach()


def test_malformed_sample_scales_are_one_line_errors(pipe, lora_set):
    mix = calibrated_mixture(pipe, lora_set)
    s, n = len(mix.scope_names), mix.n
    text = next(i for i, name in enumerate(mix.scope_names) if not name.startswith("unet:"))
    bad_text = torch.ones(1, s, n)
    bad_text[0, text, 0] = 0.5
    cases = {"factors must be": (torch.ones(1, s, n + 1), torch.zeros(2, dtype=torch.long)),
             "text-encoder scopes must have factor 1": (bad_text, torch.zeros(2, dtype=torch.long)),
             "variant must be": (torch.ones(2, s, n), torch.tensor([0, 2]))}
    for message, (factors, variant) in cases.items():
        with pytest.raises(mole.MoleError, match=message) as err, mix.sample_scales(factors, variant):
            pass
        assert "\n" not in str(err.value)
    x = torch.randn(3, 4, 8, 8)
    with pytest.raises(mole.MoleError, match="a UNet forward of 3 rows for 2 prompts"), \
            mix.sample_scales(torch.ones(1, s, n), torch.zeros(2, dtype=torch.long)), torch.no_grad():
        ctx = pipe.text_encoder(token_ids(pipe, ["a", "b", "c"]))[0]
        pipe.unet(x, torch.tensor([500] * 3), encoder_hidden_states=ctx)
    mix.set_mode("uniform")
    with pytest.raises(mole.MoleError, match="gated mode"), \
            mix.sample_scales(torch.ones(1, s, n), torch.zeros(2, dtype=torch.long)):
        pass
    mix.detach()
