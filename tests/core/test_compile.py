"""torch.compile over a gated mixture: no graph breaks, and no recompiles when the mask or the strength
changes between calls (they are data in the traced hooks, not guards). Dynamo's ``eager`` backend traces
exactly what inductor would compile, in seconds."""

from __future__ import annotations

import copy

import pytest
import torch

import mole_core as mole
from tests.fixtures.oracle import unet_inputs

pytestmark = pytest.mark.filterwarnings("ignore")


def test_mask_and_strength_changes_do_not_recompile(tiny_sd15, lora_set):
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    unet = copy.deepcopy(tiny_sd15["unet"]).eval()
    mix = mole.attach(unet, mole.load_experts(lora_set.paths), mole.GateConfig(granularity="block", init_std=0.5))
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet, backend="eager")
    settings = [([1, 1, 1], 1.0), ([1, 0, 1], 1.0), ([1, 0, 1], 0.5), ([0, 1, 1], 2.0), ([1, 1, 1], 1.0)]
    try:
        with torch.no_grad():
            for t in (900.0, 500.0):  # warm-up: the banks' device caches fill on the first two calls
                compiled(**{**unet_inputs(unet), "timestep": torch.full((2,), t)})
            graphs = counters["stats"]["unique_graphs"]
            for step, (mask, strength) in enumerate(settings):
                mix.set_mask(mask)
                mix.strength = strength
                inputs = {**unet_inputs(unet, seed=step), "timestep": torch.full((2,), 800.0 - 150 * step)}
                got = compiled(**inputs).sample
                want = unet(**inputs).sample  # eager, same settings
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert counters["stats"]["unique_graphs"] == graphs, "a mask or strength change recompiled"
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    finally:
        mix.detach()
        dynamo.reset()
