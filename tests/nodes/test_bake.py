"""MoLE Bake: mean mixture merged into the weights, exported LoRA, LoRA-Block-Weight vectors."""

from __future__ import annotations

import pytest
import torch

from tests.nodes._helpers import lora_loader, sample
from tests.nodes._nodes import apply, constant_gates, load, rel

pytestmark = pytest.mark.comfy


def bake(mole, model, experts, weights_from="recorded gate statistics", weights="", gates=None, clip=None,
         save_lora=False, prefix="mole/baked", strength=1.0):
    with torch.inference_mode():
        return mole.bake.MoleBake.execute(model=model, experts=experts, weights_from=weights_from, weights=weights,
                                          strength=strength, save_lora=save_lora, filename_prefix=prefix, clip=clip,
                                          gates=gates).args


def test_bake_recorded_statistics_equals_static_mixture_and_exported_lora(mole, tiny, experts, comfy_dirs):
    model, _ = tiny
    gates = constant_gates(mole, model, experts, comfy_dirs["mole_gates"], "bake_const.safetensors", [0.8, 0.2])
    gated, _, live = apply(mole, model, experts, "gated", gates=gates)
    with torch.inference_mode():
        sample(gated, steps=1)  # calibration run: records the mean gate per block
    baked, _, lbw, saved = bake(mole, model, experts, gates=live, save_lora=True)
    static, _, _ = apply(mole, model, experts, "static weights", "0.8, 0.2")
    assert saved.startswith("mole/baked_") and (comfy_dirs["loras"] / saved).is_file()
    exported, _ = lora_loader(model, None, comfy_dirs["loras"] / saved, 1.0)
    with torch.inference_mode():
        reference = sample(static)
        assert rel(sample(baked), reference) <= 1e-5
        assert rel(sample(exported), reference) <= 1e-5
    lines = lbw.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["a", "b"]
    values = [ln.split(":")[1].split(",") for ln in lines]
    assert len(values[0]) == 17 and set(values[0]) == {"0.8"} and set(values[1]) == {"0.2"}


def test_lbw_vectors_follow_inspire_block_order(mole, tiny, files):
    model, _ = tiny
    attn_only = load(mole, model, None, ("c.safetensors", 2.0, True))
    _, _, lbw, saved = bake(mole, model, attn_only, "uniform (NLA)")
    assert saved == ""
    assert lbw == "c:" + ",".join(["2"] * 17)  # SD1.5 attention LoRA: BASE + 6 in + mid + 9 out
    keys = attn_only.entries[0].model_keys.values()
    assert {mole.lbw.block_of(k) for k in keys} == {(0, i) for i in (1, 2, 4, 5, 7, 8)} | {(1, 1)} | \
        {(2, i) for i in range(3, 12)}


def test_bake_errors(mole, tiny, experts):
    import mole_core

    model, _ = tiny
    gated, _, live = apply(mole, model, experts, "gated")
    with pytest.raises(mole_core.MoleError, match="output of a gated MoLE Apply"):
        bake(mole, gated, experts, gates=live)
    with pytest.raises(mole_core.MoleError, match="no recorded gate statistics"):
        bake(mole, model, experts, gates=None)
    with pytest.raises(mole_core.MoleError, match="`weights` has 3 values"):
        bake(mole, model, experts, "static weights", "1, 2, 3")
    with pytest.raises(mole_core.MoleError, match="filename_prefix"):
        bake(mole, model, experts, "uniform (NLA)", save_lora=True, prefix="../../evil")


def test_bake_and_save_gates_refuse_a_symlinked_folder_that_points_outside(mole, tiny, experts, comfy_dirs, tmp_path):
    """Every write resolves symlinks: a folder inside models/loras (or models/mole_gates) that links outside is
    refused before any work, and nothing is written outside."""
    import mole_core

    outside = tmp_path / "outside"
    outside.mkdir()
    links = [comfy_dirs["loras"] / "escape", comfy_dirs["mole_gates"] / "escape"]
    for link in links:
        link.symlink_to(outside, target_is_directory=True)
    try:
        with pytest.raises(mole_core.MoleError, match="`filename_prefix` must stay inside models/loras"):
            bake(mole, tiny[0], experts, "uniform (NLA)", save_lora=True, prefix="escape/baked")
        _, _, live = apply(mole, tiny[0], experts, "gated")
        with pytest.raises(mole_core.MoleError, match="`filename` must stay inside"):
            with torch.inference_mode():
                mole.gates.MoleSaveGates.execute(gates=live, filename="escape/g", overwrite=True)
    finally:
        for link in links:
            link.unlink()
    assert list(outside.iterdir()) == []
