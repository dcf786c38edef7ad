"""ComfyUI's own TorchCompileModel on MoLE Apply's gated output: compiled sampling equals eager, MoLE's hooks
do not break the graph and a sampling run does not recompile per step.

ComfyUI picks its attention at start-up: PyTorch SDPA on GPUs (and with ``--use-pytorch-cross-attention``),
the sub-quadratic CPU attention otherwise. The latter queries free memory through psutil inside every
attention call, which breaks the graph there, between the LoRA targets of one block: run alone, compiled
sampling with it differed from eager by 7 % (also with the code from before issue #15's changes), while in the
full suite the same check passed — a known, state-dependent bug (issue #15), so not a test here.

Narrowed since (diffusers UNet, a ``torch._dynamo.graph_break()`` inside scaled-dot-product attention, dynamo's
``eager`` backend): the first compiled call equals eager, every later one differs; fixed weights (``uniform``)
show it as much as gates, so it is not the per-scope gate state; it comes from the 3×3 conv target
(``down_blocks.0.resnets.0.conv1``): one more forward hook (a no-op) registered after MoLE's on that conv makes
compiled equal eager. Small models with the same hook pattern (conv and linear hooks, cached tensors, a break in
attention) do not reproduce it."""

from __future__ import annotations

import pytest
import torch

from tests.nodes._helpers import sample
from tests.nodes._nodes import apply, random_gates, rel

pytestmark = [pytest.mark.comfy, pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


def _torch_compile_node():
    """ComfyUI's own TorchCompileModel (ComfyUI's root is on sys.path in the node tests)."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    return TorchCompileModel


def _compiled_vs_eager(mole, tiny, experts, comfy_dirs, backend: str) -> tuple[float, int, int]:
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    gates = random_gates(mole, tiny[0], experts, comfy_dirs["mole_gates"], "compile.safetensors", std=0.5)
    m, _, _ = apply(mole, tiny[0], experts, "gated", gates=gates)
    with torch.inference_mode():
        eager = sample(m, steps=5)
        dynamo.reset()
        counters.clear()
        compiled = _torch_compile_node().execute(model=m, backend=backend).args[0]
        got = sample(compiled, steps=5)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    dynamo.reset()
    return rel(got, eager), graphs, breaks


def test_torch_compile_model_node_runs_gated_mole_like_eager(mole, tiny, experts, comfy_dirs, monkeypatch):
    """With PyTorch attention (ComfyUI's choice on a GPU): the inductor-compiled sampling equals eager, in one
    graph without breaks, and the 5 steps (10 model calls with CFG) compile at most twice (the banks' device
    caches fill on the first call)."""
    import comfy.ldm.modules.attention as attention

    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    diff, graphs, breaks = _compiled_vs_eager(mole, tiny, experts, comfy_dirs, "inductor")
    assert diff <= 1e-4
    assert breaks == 0
    assert graphs <= 2, f"{graphs} graphs for 5 sampling steps: a recompile per step"


@pytest.mark.xfail(strict=False, reason="known, state-dependent bug (issue #15; fails alone, passes after the "
                   "full suite): with ComfyUI's CPU attention (sub-quadratic; it reads free memory through psutil, "
                   "a graph break inside every attention) compiled sampling differs from eager by 7 % from the "
                   "second compiled call on; it comes from the 3×3 conv target, not the gate state (module docstring)")
def test_torch_compile_with_comfy_cpu_attention(mole, tiny, experts, comfy_dirs, monkeypatch):
    import comfy.ldm.modules.attention as attention

    torch._dynamo.reset()  # the bug showed alone but not after other compiled tests: start from no cached graphs
    # ComfyUI's attention is process-global (picked at import): pin the CPU one, whatever ran before
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_sub_quad)
    diff, _, _ = _compiled_vs_eager(mole, tiny, experts, comfy_dirs, "eager")  # dynamo alone shows it, in seconds
    assert diff <= 1e-4
