"""Gate files round-trip and refuse other experts with one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import mole_core as mole
from tests.core._models import TinyNet, random_expert


@pytest.fixture
def setup():
    torch.manual_seed(0)
    net = TinyNet().eval()
    experts = [random_expert(net, r, s, name=f"e{s}.safetensors") for r, s in ((4, 1), (8, 2), (16, 3))]
    return net, experts


def _randomize(mix):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in mix.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_round_trip_reproduces_outputs_and_metadata(setup, tmp_path):
    net, experts = setup
    x = torch.randn(2, 4, 8, 8)
    mix = mole.attach(net, experts, mole.GateConfig(granularity="layer", gate_input="experts", tau_init=0.5))
    _randomize(mix)
    with torch.no_grad():
        want = net(x)
    path = mole.save_gates(mix, tmp_path / "g.safetensors", training={"steps": 3}, metrics={"loss": 0.1})
    mix.detach()
    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["mole"])
    assert [e["name"] for e in info["experts"]] == ["e1.safetensors", "e2.safetensors", "e3.safetensors"]
    assert info["gate_config"]["granularity"] == "layer" and info["training"]["steps"] == 3
    assert all(len(e["sha256"]) == 64 for e in info["experts"])
    mix2 = mole.attach(net, experts, gates=path)  # config comes from the file
    assert mix2.config.gate_input == "experts" and mix2.config.tau_init == 0.5
    with torch.no_grad():
        torch.testing.assert_close(net(x), want)
    mix2.detach()


def test_in_memory_snapshot_and_reattach(setup, tmp_path):
    net, experts = setup
    x = torch.randn(2, 4, 8, 8)
    mix = mole.attach(net, experts)
    _randomize(mix)
    gf = mole.snapshot(mix)
    with torch.no_grad():
        want = net(x)
        mix.detach()
        assert not mix.attached
        mix.reattach()
        mix.reattach()  # idempotent
        torch.testing.assert_close(net(x), want)
    mix.detach()
    mix2 = mole.attach(net, experts, gates=gf)
    with torch.no_grad():
        torch.testing.assert_close(net(x), want)
    mix2.detach()


def test_mismatches_are_refused_naming_the_difference(setup, tmp_path):
    net, experts = setup
    mix = mole.attach(net, experts)
    path = mole.save_gates(mix, tmp_path / "g.safetensors")
    mix.detach()
    other = random_expert(net, 8, 99, name="other.safetensors")
    cases = [
        ([experts[0], other, experts[2]], r"expert 2 should be 'e2.safetensors' sha256 \w+, got 'other.safetensors'"),
        ([experts[1], experts[0], experts[2]], r"expert 1 should be 'e1.safetensors'.*order differs"),
        (experts[:2], r"gates are for 3 experts"),
    ]
    for exps, pattern in cases:
        with pytest.raises(mole.MoleError, match=pattern) as info:
            mole.attach(net, exps, gates=path)
        assert "\n" not in str(info.value) and "g.safetensors" in str(info.value)
    assert not net._forward_hooks and all(not m._forward_hooks for m in net.modules())  # failed attach detached
    renamed = [random_expert(net, r, s, name=f"e{s}.safetensors") for r, s in ((4, 1), (8, 2), (16, 3))]
    for e in renamed:
        e.sha256 = "0" * 64
    mole.attach(net, renamed, gates=path, match="name").detach()


def test_wrong_granularity_and_corrupt_files(setup, tmp_path):
    net, experts = setup
    mix = mole.attach(net, experts, mole.GateConfig(granularity="block"))
    path = mole.save_gates(mix, tmp_path / "g.safetensors")
    with pytest.raises(mole.MoleError, match="granularity is 'block', the mixture uses 'matrix'"):
        mix.detach()
        m2 = mole.attach(net, experts, mole.GateConfig(granularity="matrix"))
        mole.load_gates(m2, path)
    m2.detach()
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-40])
    with pytest.raises(mole.MoleError, match="cut.safetensors"):
        mole.read_gate_file(tmp_path / "cut.safetensors")
    lora = tmp_path / "lora.safetensors"
    mole.export_lora(mole.attach(net, experts, mode="uniform"), lora)
    with pytest.raises(mole.MoleError, match="not a MoLE gate file"):
        mole.read_gate_file(lora)


def test_save_is_atomic_and_refuses_missing_directory(setup, tmp_path):
    net, experts = setup
    mix = mole.attach(net, experts)
    with pytest.raises(mole.MoleError, match="does not exist"):
        mole.save_gates(mix, tmp_path / "nope" / "g.safetensors")
    mole.save_gates(mix, tmp_path / "g.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"]  # no temp file left
    mix.detach()


def test_gate_files_get_the_mode_every_other_output_gets(setup, tmp_path):
    """0666 minus the umask, like PNGs and JSON the tools write (a temp-file-and-rename must not leave 0600)."""
    import os
    import stat

    net, experts = setup
    mix = mole.attach(net, experts)
    old = os.umask(0o022)
    try:
        path = mole.save_gates(mix, tmp_path / "g.safetensors")
        (tmp_path / "other.json").write_text("{}")
    finally:
        os.umask(old)
        mix.detach()
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "other.json").stat().st_mode) == 0o644


def test_gate_scopes_that_match_no_block_warn(setup):
    """A gate file with a scope this model lacks (in a component it has) warns instead of dropping it silently."""
    import dataclasses

    from mole_core.gate_file import apply_gate_file

    net, experts = setup
    mix = mole.attach(net, experts)
    gf = mole.snapshot(mix)
    first = next(iter(gf.scopes))
    ghost = first.split(":", 1)[0] + ":ghost_block"
    tensors = {**gf.tensors, **{k.replace(f"gates.{first}.", f"gates.{ghost}."): v.clone()
                                for k, v in gf.tensors.items() if k.startswith(f"gates.{first}.")}}
    extra = dataclasses.replace(gf, scopes={**gf.scopes, ghost: dict(gf.scopes[first])}, tensors=tensors)
    with pytest.warns(mole.MoleWarning, match="1 gate scopes match no block of this model.*ghost_block"):
        apply_gate_file(mix, extra)
    mix.detach()
