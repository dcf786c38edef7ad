"""Smoke test of the benchmarks: each script runs with ``--quick --json`` and prints a complete, finite JSON line.

No timing assertions: the numbers depend on the machine; only the output contract is checked.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

KEYS = {
    "layer.py": ["rows", "max_mole_vs_floor", "machine"],
    "unet_step.py": ["ratio_gated_vs_base", "ratio_static_vs_base", "ratio_vs_diffusers_unmerged",
                     "added_time_vs_naive_loop", "ms", "N", "r", "shapes", "torch", "threads", "peak_mib",
                     "replay_ratio_gated_vs_base", "gate_fraction_max_latent"],
    "train_step.py": ["ratio_train_vs_forward", "ratio_train_ckpt_vs_forward", "peak_mib", "flops",
                      "official_flops_over_ours", "checkpointing"],
    "overhead.py": ["rows", "gated_vs_peft", "machine"],
    "gpu.py": ["rows", "machine"],
    "methods.py": ["ms", "ratio_to_base", "composite_vs_separate", "composite_vs_gated", "switch_vs_merged",
                   "composite_max_rel_diff_vs_separate"],
    "compile_check.py": ["graph_break_count", "graph_breaks_in_mole_core", "expert_tensor_copies_per_call", "copies",
                         "recompiles_after_second_call"],
}


def _numbers(obj: object) -> list[float]:
    """Every number under ``obj``; a JSON null (a non-finite value in the benchmark) counts as NaN."""
    if obj is None:
        return [math.nan]
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return []


def _run(script: str, *extra: str) -> dict:
    cmd = [sys.executable, str(REPO / "bench" / script), "--quick", "--json", "--threads", "1", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-4000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(KEYS))
def test_bench_quick_json(script: str) -> None:
    extra = ("--no-compile",) if script == "compile_check.py" else ()
    res = _run(script, *extra)
    missing = [k for k in KEYS[script] if k not in res]
    assert not missing, f"{script}: missing keys {missing}"
    for key in KEYS[script]:
        vals = _numbers(res[key])
        assert all(math.isfinite(v) for v in vals), f"{script}: non-finite value under {key!r}"
    if script == "methods.py":  # the one batched Composite call averages like N separate calls
        assert res["composite_max_rel_diff_vs_separate"] < 1e-4
