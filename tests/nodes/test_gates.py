"""MoLE Save Gates / Load Gates / Visualize Gates: folder, file names, corrupt files, heatmaps."""

from __future__ import annotations

import json

import pytest
import torch

from tests.nodes._helpers import sample
from tests.nodes._nodes import apply, load_gates, random_gates

pytestmark = pytest.mark.comfy


def save(mole, gates, filename, overwrite=False):
    with torch.inference_mode():
        return mole.gates.MoleSaveGates.execute(gates=gates, filename=filename, overwrite=overwrite)


def visualize(mole, gates, by_timestep=False, scale=1):
    with torch.inference_mode():
        return mole.gates.MoleVisualizeGates.execute(gates=gates, by_timestep=by_timestep, scale=scale)


@pytest.fixture(scope="module")
def sampled(mole, tiny, experts, comfy_dirs):
    """A gated MoLE with input-dependent gates after one sampling run: ``(gates out of Apply, loaded gates)``."""
    model, _ = tiny
    loaded = random_gates(mole, model, experts, comfy_dirs["mole_gates"], "vis.safetensors")
    m, _, out = apply(mole, model, experts, "gated", gates=loaded, buckets=2)
    with torch.inference_mode():
        sample(m, steps=2)
    return out, loaded


def test_gate_folder_is_registered_safetensors_only(mole, comfy_dirs):
    import folder_paths

    paths, exts = folder_paths.folder_names_and_paths["mole_gates"]
    assert exts == {".safetensors"}
    assert str(comfy_dirs["mole_gates"]) in paths
    assert paths[-1].endswith("models/mole_gates") or any(p.endswith("mole_gates") for p in paths)
    (comfy_dirs["mole_gates"] / "notes.json").write_text("{}")
    assert "notes.json" not in folder_paths.get_filename_list("mole_gates")


def test_register_keeps_paths_from_extra_model_paths_yaml(mole):
    import folder_paths

    saved = folder_paths.folder_names_and_paths.pop("mole_gates")
    try:
        folder_paths.add_model_folder_path("mole_gates", "/yaml/mole_gates")  # what extra_model_paths.yaml does
        mole.common.register_gate_folder()
        paths, exts = folder_paths.folder_names_and_paths["mole_gates"]
        assert "/yaml/mole_gates" in paths and paths[0].endswith("mole_gates") and exts == {".safetensors"}
    finally:
        folder_paths.folder_names_and_paths["mole_gates"] = saved


def test_save_and_load_round_trip_with_statistics(mole, sampled, comfy_dirs):
    gates, loaded = sampled
    out = save(mole, gates, "runs/first")
    assert out.args[0] == "runs/first.safetensors"
    assert (comfy_dirs["mole_gates"] / "runs" / "first.safetensors").is_file()
    back = load_gates(mole, "runs/first.safetensors")
    for key, value in loaded.gate_file.tensors.items():
        assert torch.equal(back.gate_file.tensors[key], value), key
    stats = back.statistics()
    assert stats["mean"] == gates.statistics()["mean"] and set(stats["by_bucket"]) == {"0", "1"}
    assert back.expert_names == ["a.safetensors", "b.safetensors"]


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/tmp/evil", "C:/evil", "x.pt", "", "a\x00b",
                                  "x" * 600, "d/" + "y" * 240])
def test_save_refuses_names_outside_the_folder(mole, sampled, name):
    import mole_core

    with pytest.raises(mole_core.MoleError, match="filename"):
        save(mole, sampled[0], name)


def test_save_refuses_to_overwrite_unless_asked(mole, sampled):
    import mole_core

    save(mole, sampled[0], "twice")
    with pytest.raises(mole_core.MoleError, match="already exists.*overwrite"):
        save(mole, sampled[0], "twice")
    save(mole, sampled[0], "twice", overwrite=True)


def test_load_refuses_dotdot_names_and_corrupt_files(mole, comfy_dirs):
    import mole_core

    check = mole.gates.MoleLoadGates.validate_inputs
    assert "no '..'" in check(gate_file="../secret.safetensors")
    assert "not found" in check(gate_file="missing.safetensors")
    (comfy_dirs["mole_gates"] / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert check(gate_file="corrupt.safetensors") is True
    with pytest.raises(mole_core.MoleError, match=r"corrupt.safetensors: (truncated|not a safetensors)"):
        load_gates(mole, "corrupt.safetensors")
    with pytest.raises(mole_core.MoleError, match="no '..'"):
        load_gates(mole, "../corrupt.safetensors")


def test_visualize_recorded_statistics(mole, sampled):
    gates, _ = sampled
    out = visualize(mole, gates, by_timestep=True)
    image, csv, text, passed = out.args
    assert image.dim() == 4 and image.shape[0] == 1 and image.shape[-1] == 3 and 0 <= image.min() <= image.max() <= 1
    single = visualize(mole, gates).args[0]
    assert image.shape[1] > single.shape[1]  # one extra heatmap per timestep bucket
    payload = out.ui["mole_gates"][0]
    assert json.loads(text) == payload and passed is gates
    assert payload["experts"] == ["a.safetensors", "b.safetensors"]
    assert payload["labels"][0] == "down0.res0" and "mid.attn0" in payload["labels"]
    assert set(payload["buckets"]) == {"0", "1"} and payload["bucket_labels"]["0"] == "t 1000-500"
    assert len(csv.strip().splitlines()) == len(payload["blocks"]) + 1
    assert out.ui["images"] and json.dumps(payload)


def test_visualize_static_weights_and_gate_prior(mole, tiny, experts, sampled):
    _, _, fixed = apply(mole, tiny[0], experts, "static weights", "0.25, 0.75")
    payload = visualize(mole, fixed).ui["mole_gates"][0]
    assert "fixed" in payload["title"] and payload["values"][1][0] == 0.75
    prior = visualize(mole, sampled[1]).ui["mole_gates"][0]
    assert "prior" in prior["title"] and prior["values"][0][0] == pytest.approx(0.5)
