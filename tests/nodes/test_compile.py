"""ComfyUI's own TorchCompileModel on MoLE Apply's gated output: compiled sampling equals eager, the graph is
not broken by MoLE's hooks and a sampling run does not recompile per step."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.nodes._helpers import sample
from tests.nodes._nodes import apply, random_gates, rel

pytestmark = [pytest.mark.comfy, pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


def _torch_compile_node():
    from tests.nodes.conftest import COMFYUI

    spec = importlib.util.spec_from_file_location("nodes_torch_compile", COMFYUI / "comfy_extras"
                                                  / "nodes_torch_compile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TorchCompileModel


@pytest.mark.xfail(strict=True, reason="known bug (issue #15, also before this stop): under torch.compile in ComfyUI "
                   "some of MoLE's forward hooks do not run (the gate of up_blocks.3.resnets.2 is never computed, "
                   "gates downstream of down_blocks.1 differ): compiled sampling differs from eager by 7 %; the "
                   "diffusers path compiles exactly (tests/core/test_compile.py)")
def test_torch_compile_model_node_runs_gated_mole_like_eager(mole, tiny, experts, comfy_dirs):
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    gates = random_gates(mole, tiny[0], experts, comfy_dirs["mole_gates"], "compile.safetensors", std=0.5)
    m, _, _ = apply(mole, tiny[0], experts, "gated", gates=gates)
    with torch.inference_mode():
        eager = sample(m, steps=5)
        dynamo.reset()
        counters.clear()
        compiled = _torch_compile_node().execute(model=m, backend="inductor").args[0]
        got = sample(compiled, steps=5)
    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    dynamo.reset()
    assert rel(got, eager) <= 1e-4
    assert breaks == 0, dict(counters["graph_break"])
    assert graphs <= 2, f"{graphs} graphs for 5 sampling steps: a recompile per step"  # warm-up fills caches once
