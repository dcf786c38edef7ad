"""`train` runs unchanged under torchrun (DDP, gloo, 2 CPU processes) and matches one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mole_core as mole

ROOT = Path(__file__).resolve().parents[2]


def _run(argv: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(tmp_path, tiny_sd15_dir, lora_set, refs_dir):
    common = ["train", "--base", str(tiny_sd15_dir), *[a for p in lora_set.paths for a in ("--lora", str(p))],
              "--images", str(refs_dir), "--steps", "3", "--resolution", "64", "--batch-size", "4", "--lr", "0.02",
              "--device", "cpu", "--checkpoint-every", "0"]
    single = _run([sys.executable, "-m", "train", *common, "--out", str(tmp_path / "one.safetensors")], tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
                *common, "--out", str(tmp_path / "two.safetensors")], tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = mole.read_gate_file(tmp_path / "one.safetensors")
    two = mole.read_gate_file(tmp_path / "two.safetensors")
    assert two.info["training"]["world_size"] == 2 and one.info["training"]["world_size"] == 1
    moved = 0
    for k, v in one.tensors.items():
        torch.testing.assert_close(two.tensors[k], v, atol=2e-5, rtol=1e-4, msg=k)
        moved += int(v.abs().max() > 0)
    assert moved > 0
    assert ddp.stdout.count("done:") == 1  # only rank 0 reports and writes
