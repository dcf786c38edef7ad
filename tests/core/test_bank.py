"""ExpertBank equals a per-expert loop for Linear, 1×1 and 3×3 conv, ragged ranks, all dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mole_core.bank import ExpertBank
from mole_core.errors import MoleError
from mole_core.expert import LoraFactor, factor_from_delta

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}
CASES = [
    ("linear", lambda: nn.Linear(24, 40), (3, 17, 24)),
    ("linear2d", lambda: nn.Linear(24, 40), (3, 24)),
    ("conv1x1", lambda: nn.Conv2d(12, 20, 1), (3, 12, 6, 5)),
    ("conv3x3", lambda: nn.Conv2d(12, 20, 3, padding=1), (3, 12, 6, 5)),
    ("conv3x3_stride2", lambda: nn.Conv2d(12, 20, 3, stride=2, padding=1, dilation=1), (3, 12, 9, 7)),
    ("conv3x3_dilated", lambda: nn.Conv2d(12, 20, 3, padding=2, dilation=2), (2, 12, 8, 8)),
]


def _factor(m: nn.Module, r: int, g: torch.Generator, alpha: float | None) -> LoraFactor:
    if isinstance(m, nn.Linear):
        return LoraFactor(torch.randn(r, m.in_features, generator=g), torch.randn(m.out_features, r, generator=g),
                          alpha=alpha)
    k = m.kernel_size
    return LoraFactor(torch.randn(r, m.in_channels, *k, generator=g), torch.randn(m.out_channels, r, 1, 1,
                                                                                  generator=g), alpha=alpha)


def _naive(m: nn.Module, x: torch.Tensor, factors: list[LoraFactor], gates: torch.Tensor) -> torch.Tensor:
    """Official-style loop: Σ_i g_i s_i up_i(down_i(x)), per expert."""
    out = 0
    for i, f in enumerate(factors):
        if isinstance(m, nn.Linear):
            y = F.linear(F.linear(x.float(), f.down.float()), f.up.float())
            gi = gates[:, i].reshape(-1, *([1] * (x.dim() - 1)))
        else:
            h = F.conv2d(x.float(), f.down.float(), None, m.stride, m.padding, m.dilation)
            y = F.conv2d(h, f.up.float())
            gi = gates[:, i].reshape(-1, 1, 1, 1)
        out = out + gi * f.scale * y
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_bank_equals_per_expert_loop(name, make, shape, dtype):
    g = torch.Generator().manual_seed(0)
    m = make()
    ranks, alphas = [4, 8, 16], [2.0, None, 32.0]
    factors = [_factor(m, r, g, a) for r, a in zip(ranks, alphas)]
    bank = ExpertBank("unet:x", list(enumerate(factors)), m)
    assert bank.rank == sum(ranks)
    x = torch.randn(*shape, generator=g)
    gates = torch.softmax(torch.randn(shape[0], 3, generator=g), -1)
    want = _naive(m, x, factors, gates)
    xd = x.to(dtype)
    coef = gates[:, bank.seg]
    got = bank.expand(bank.shrink(xd), coef.to(dtype)).float()
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = (got - want).abs().max() / want.abs().max()
    assert err < TOL[dtype], f"{name} {dtype}: rel err {err}"


def test_pooled_expert_outputs_match_definition():
    g = torch.Generator().manual_seed(1)
    m = nn.Linear(10, 6)
    factors = [_factor(m, r, g, None) for r in (2, 3)]
    bank = ExpertBank("unet:x", list(enumerate(factors)), m)
    x = torch.randn(4, 9, 10, generator=g)
    pooled = bank.pooled_expert_outputs(bank.shrink(x), 2)
    for i, f in enumerate(factors):
        ref = (x @ f.down.T @ f.up.T * f.scale).mean(1)
        torch.testing.assert_close(pooled[:, i], ref, atol=1e-5, rtol=1e-5)


def test_bank_caches_tensors_per_device_and_dtype():
    m = nn.Linear(8, 8)
    bank = ExpertBank("unet:x", [(0, LoraFactor(torch.randn(2, 8), torch.randn(8, 2)))], m)
    a1 = bank.tensors(torch.device("cpu"), torch.float32)
    a2 = bank.tensors(torch.device("cpu"), torch.float32)
    assert a1[0] is a2[0]
    b1 = bank.tensors(torch.device("cpu"), torch.bfloat16)
    assert b1[0].dtype == torch.bfloat16 and len(bank._cache) == 2


def test_bank_rejects_shape_mismatch_naming_target():
    m = nn.Linear(8, 8)
    bad = LoraFactor(torch.randn(2, 9), torch.randn(8, 2))
    with pytest.raises(MoleError, match=r"unet:blocks.0.to_q: LoRA is 9→8 but the model layer is 8→8"):
        ExpertBank("unet:blocks.0.to_q", [(0, bad)], m)


def test_linear_factor_on_1x1_conv_and_back():
    conv = nn.Conv2d(6, 5, 1)
    f = LoraFactor(torch.randn(2, 6), torch.randn(5, 2), alpha=1.0)
    bank = ExpertBank("unet:c", [(0, f)], conv)
    assert bank.a_cat.shape == (2, 6, 1, 1)
    lin = nn.Linear(6, 5)
    f4 = LoraFactor(torch.randn(2, 6, 1, 1), torch.randn(5, 2, 1, 1))
    assert ExpertBank("unet:l", [(0, f4)], lin).a_cat.shape == (2, 6)


@pytest.mark.parametrize("shape", [(5, 7), (7, 5), (6, 4, 3, 3), (8, 3, 1, 1)])
def test_dense_fallback_factorisation_is_exact(shape):
    delta = torch.randn(*shape)
    f = factor_from_delta(delta)
    assert f.dense
    torch.testing.assert_close(f.delta(), delta)


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_add_one_is_the_single_expert_alone(name, make, shape):
    """LoRA Switch's fast path: ``out + scale · expert e`` from e's rank rows equals the per-expert loop with
    a one-hot gate; an expert without a factor on the layer leaves ``out`` unchanged."""
    g = torch.Generator().manual_seed(1)
    m = make()
    factors = [_factor(m, r, g, a) for r, a in zip([4, 8, 16], [2.0, None, 32.0])]
    bank = ExpertBank("unet:x", [(0, factors[0]), (2, factors[2])], m)  # expert 1 has no factor here
    x = torch.randn(*shape, generator=g)
    out = torch.randn_like(m(x))
    for e, f in ((0, factors[0]), (2, factors[2])):
        want = out + 0.7 * _naive(m, x, [f], torch.ones(shape[0], 1))
        torch.testing.assert_close(bank.add_one(out, x, e, 0.7), want, atol=1e-4, rtol=1e-4)
    assert torch.equal(bank.add_one(out, x, 1, 0.7), out)
