"""Headless ComfyUI server with MoLE in ``custom_nodes``: /object_info, an API-format graph end to
end (Load Experts → Apply → KSampler → Visualize → Save Gates, then Load Gates → Apply → KSampler),
and bad inputs that must fail on their node while the server keeps serving."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import urllib.error

import pytest
import torch
from safetensors.torch import load_file

from tests.nodes import _loras
from tests.nodes._nodes import apply, load
from tests.nodes._server import install_loras

pytestmark = [pytest.mark.slow, pytest.mark.comfy]
NODE_IDS = ["MoLE_LoadExperts", "MoLE_Apply", "MoLE_SaveGates", "MoLE_LoadGates", "MoLE_VisualizeGates", "MoLE_Bake",
            "MoLE_TrainGates"]


def execution_error(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", entry["status"]
    return next(data for kind, data in entry["status"]["messages"] if kind == "execution_error")


def graph(loras=("a.safetensors", "b.safetensors"), mode="gated", weights="", gates_file=None,
          save_as="e2e/run1", sample=True) -> dict:
    """The acceptance graph in API format."""
    g = {
        **_head("sd15", tuple(loras), mode, weights),
        "8": {"class_type": "MoLE_VisualizeGates", "inputs": {"gates": ["3", 2], "by_timestep": True, "scale": 1}},
    }
    if gates_file is not None:
        g["10"] = {"class_type": "MoLE_LoadGates", "inputs": {"gate_file": gates_file}}
        g["3"]["inputs"]["gates"] = ["10", 0]
    if sample:
        g.update({
            "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 1], "text": "a photo of a cat"}},
            "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 1], "text": ""}},
            "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
            "7": {"class_type": "KSampler", "inputs": {
                "model": ["3", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "seed": 0,
                "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        })
        g["8"]["inputs"]["samples"] = ["7", 0]
    if save_as:
        g["9"] = {"class_type": "MoLE_SaveGates", "inputs": {"gates": ["8", 3], "filename": save_as,
                                                             "overwrite": True}}
    return g


@pytest.fixture(scope="module")
def server(comfy_server, mole, tiny, files):
    """The session's headless server (started early by ``comfy_server``) with LoRAs and gate files."""
    srv, base = comfy_server
    loras, gates = install_loras(base, files, ("a", "b", "c")), base / "models" / "mole_gates"
    gates.mkdir(parents=True, exist_ok=True)
    _loras.write_other_family(loras / "sdxl_style.safetensors")
    import mole_core

    model = tiny[0]
    _, _, other = apply(mole, model, load(mole, model, None, ("a.safetensors", 1.0, True),
                                          ("c.safetensors", 1.0, True)), "gated")
    mole_core.write_gate_file(other.gate_file, gates / "other.safetensors")
    (gates / "corrupt.safetensors").write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{not json")
    srv.wait_ready()
    return srv, base


def test_object_info_lists_every_node_with_inputs(server):
    srv, _ = server
    info = srv.get("/object_info")
    for node_id in NODE_IDS:
        node = info[node_id]
        assert node["category"] == "MoLE" and node["experimental"] is True, node_id
        inputs = {**node["input"]["required"], **node["input"].get("optional", {})}
        assert inputs and all(spec[1].get("tooltip") for spec in inputs.values()), node_id
    assert "a.safetensors" in info["MoLE_LoadExperts"]["input"]["required"]["lora_1"][1]["options"]
    assert "other.safetensors" in info["MoLE_LoadGates"]["input"]["required"]["gate_file"][1]["options"]
    assert info["MoLE_Apply"]["output"] == ["MODEL", "CLIP", "MOLE_GATES"]


def test_graph_runs_end_to_end_and_gates_round_trip(server):
    srv, base = server
    entry = srv.run(graph())
    assert entry["status"]["status_str"] == "success", entry["status"]
    payload = entry["outputs"]["8"]["mole_gates"][0]
    assert payload["experts"] == ["a.safetensors", "b.safetensors"] and entry["outputs"]["8"]["images"]
    assert set(payload["buckets"]) == {"0", "1"} and "mid.attn0" in payload["labels"]
    saved = base / "models" / "mole_gates" / "e2e" / "run1.safetensors"
    assert saved.is_file()
    import mole_core

    assert mole_core.read_gate_file(saved).info["calibration"]["samples"] > 0
    again = srv.run(graph(gates_file="e2e/run1.safetensors", save_as="e2e/run2"))
    assert again["status"]["status_str"] == "success", again["status"]
    assert (base / "models" / "mole_gates" / "e2e" / "run2.safetensors").is_file()


def test_last_sampling_run_of_an_apply_node_is_served(server):
    srv, _ = server
    entry = srv.run(graph(save_as=None))
    assert entry["status"]["status_str"] == "success", entry["status"]
    run = srv.get("/mole/runs/3")  # "3" is MoLE Apply in the graph
    assert run["experts"] == ["a.safetensors", "b.safetensors"] and run["component"] == "unet"
    assert set(run["summary"]["by_bucket"]) == {"0", "1"} and run["summary"]["samples"] > 0
    for path, status in (("/mole/runs/999", 404), ("/mole/runs/bad%20id", 400)):
        with pytest.raises(urllib.error.HTTPError) as err:
            srv.get(path)
        assert err.value.code == status and "error" in json.loads(err.value.read())


@pytest.mark.parametrize("case, node, message", [
    ({"loras": ()}, "2", "pick at least one LoRA"),
    ({"loras": ("sdxl_style.safetensors",)}, "2", "0 of its LoRA modules match"),
    ({"gates_file": "other.safetensors"}, "3", "expert 2 should be 'c.safetensors'"),
    ({"mode": "static weights", "weights": "0.5"}, "3", "`weights` has 1 values but there are 2 experts"),
    ({"gates_file": "corrupt.safetensors"}, "10", "corrupt.safetensors"),
    ({"save_as": "../escape"}, "9", "must be a file name inside models/mole_gates"),
])
def test_bad_inputs_fail_on_their_node_and_the_server_keeps_serving(server, case, node, message):
    srv, base = server
    kwargs = {"sample": False, "save_as": None, **case}
    err = execution_error(srv.run(graph(**kwargs)))
    assert err["node_id"] == node and message in err["exception_message"], err
    assert srv.get("/system_stats")["system"]
    assert not (base / "models" / "escape.safetensors").exists()


def test_dotdot_gate_file_name_is_rejected_at_validation(server):
    srv, _ = server
    status, body = srv.post(graph(gates_file="../secret.safetensors", sample=False, save_as=None))
    assert status == 400
    errors = body["node_errors"]["10"]["errors"]
    assert any("no '..'" in e.get("details", "") for e in errors), errors
    assert srv.get("/system_stats")["system"]
    entry = srv.run(graph(mode="uniform (NLA)", sample=False, save_as=None))
    assert entry["status"]["status_str"] == "success"
    assert torch.tensor(entry["outputs"]["8"]["mole_gates"][0]["values"]).eq(0.5).all()


MODEL_NODES = {"sd15": "MoLETestTinyModel", "sdxl": "MoLETestTinySDXL", "sd2": "MoLETestTinySD2"}


def _head(family: str, loras: tuple[str, ...], mode: str = "gated", weights: str = "", mask: str = "") -> dict:
    """Nodes 1–3: the test pack's tiny ``family`` model → MoLE Load Experts (``loras``, strength 1) → MoLE Apply."""
    return {
        "1": {"class_type": MODEL_NODES[family], "inputs": {"seed": 0}},
        "2": {"class_type": "MoLE_LoadExperts", "inputs": {
            "model": ["1", 0], "clip": ["1", 1],
            **{k: v for i, name in enumerate([*loras, *["None"] * (4 - len(loras))], 1)
               for k, v in ((f"lora_{i}", name), (f"strength_{i}", 1.0), (f"on_{i}", True))}}},
        "3": _apply(mode, weights, mask),
    }


def _apply(mode: str, weights: str = "", mask: str = "") -> dict:
    """MoLE Apply on node 1's MODEL and CLIP with node 2's experts."""
    return {"class_type": "MoLE_Apply", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "experts": ["2", 0], "mode": mode, "strength": 1.0, "weights": weights,
        "mask": mask, "timestep_buckets": 2}}


def _lora_loaders(names: tuple[str, str], strengths: tuple[float, float], first: int) -> dict:
    """Two chained core ``LoraLoader``s (ids ``first``, ``first + 1``) on node 1's MODEL and CLIP, ``names[i]`` at
    ``strengths[i]`` on both."""
    return {str(first + i): {"class_type": "LoraLoader", "inputs": {
        "model": [src, 0], "clip": [src, 1], "lora_name": name, "strength_model": strength, "strength_clip": strength}}
        for i, (src, name, strength) in enumerate(zip(("1", str(first)), names, strengths))}


def _text_nodes(family: str, clip: list, first: int, width: int, height: int) -> dict:
    """Positive (id ``first``) and empty negative (``first + 1``) conditioning from ``clip`` (SDXL:
    ``CLIPTextEncodeSDXL`` with size and crop conditioning)."""
    if family == "sdxl":
        size = {"width": width, "height": height, "crop_w": 0, "crop_h": 0, "target_width": width,
                "target_height": height}
        return {str(first + i): {"class_type": "CLIPTextEncodeSDXL",
                                 "inputs": {"clip": clip, **size, "text_g": t, "text_l": t}}
                for i, t in enumerate(("a photo of a cat", ""))}
    return {str(first + i): {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": t}}
            for i, t in enumerate(("a photo of a cat", ""))}


def sized_graph(family: str, loras: tuple[str, str], width: int, height: int, mask: str = "",
                gates_file: str | None = None) -> dict:
    """Tiny SDXL or SD2.x-v → Load Experts (two LoRAs) → gated Apply → text encoding → KSampler with CFG at
    ``width``×``height`` → Visualize Gates."""
    g = {
        **_head(family, loras, mask=mask),
        **_text_nodes(family, ["3", 1], 4, width, height),
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "seed": 0,
            "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "8": {"class_type": "MoLE_VisualizeGates", "inputs": {"gates": ["3", 2], "by_timestep": True, "scale": 1,
                                                               "samples": ["7", 0]}},
    }
    if gates_file is not None:
        g["10"] = {"class_type": "MoLE_LoadGates", "inputs": {"gate_file": gates_file}}
        g["3"]["inputs"]["gates"] = ["10", 0]
    return g


def sdxl_graph(width: int, height: int, mask: str = "", gates_file: str | None = None) -> dict:
    return sized_graph("sdxl", ("xl_a.safetensors", "xl_b.safetensors"), width, height, mask, gates_file)


def test_sdxl_gated_with_cfg_and_size_conditioning_at_three_sizes_with_one_gate_file(server, mole, comfy_dirs):
    """One gate file (written from the first run) serves 64², 128² and a non-square 96×64; masking runs."""
    import mole_core
    from tests.nodes.testing_pack.tiny_comfy import tiny_sdxl_model

    srv, base = server
    with torch.inference_mode():
        model = tiny_sdxl_model(0)  # the server builds the same weights from the same seed
    for i, name in enumerate(("xl_a", "xl_b")):
        lora = _loras.random_lora(model, None, seed=20 + i, rank=4, alpha=2.0, conv=False)
        for folder in (base / "models" / "loras", comfy_dirs["loras"]):  # the server's and this process's
            _loras.write_kohya(lora, folder / f"{name}.safetensors")
    first = srv.run(sdxl_graph(64, 64))
    assert first["status"]["status_str"] == "success", first["status"]
    payload = first["outputs"]["8"]["mole_gates"][0]
    assert payload["experts"] == ["xl_a.safetensors", "xl_b.safetensors"] and "up0.attn2" in payload["labels"]
    experts = load(mole, model, None, ("xl_a.safetensors", 1.0, True), ("xl_b.safetensors", 1.0, True))
    _, _, fresh = apply(mole, model, experts, "gated")
    mole_core.write_gate_file(fresh.gate_file, base / "models" / "mole_gates" / "xl.safetensors")
    for width, height, mask in ((128, 128, ""), (96, 64, ""), (96, 64, "1, 0")):
        entry = srv.run(sdxl_graph(width, height, mask, gates_file="xl.safetensors"))
        assert entry["status"]["status_str"] == "success", (width, height, mask, entry["status"])
        assert entry["outputs"]["8"]["mole_gates"][0]["experts"] == ["xl_a.safetensors", "xl_b.safetensors"]


def test_sd2_v_gated_with_cfg_at_three_sizes_with_one_gate_file(server, mole, comfy_dirs):
    """SD2.x 768-v on the server (OpenCLIP-H, v-prediction, LoRAs with text-encoder parts): one gate file serves
    64², 128² and a non-square 96×64 with CFG; masking runs; Visualize Gates labels its blocks."""
    import mole_core
    from tests.nodes.testing_pack.tiny_comfy import tiny_sd2_clip, tiny_sd2_model

    srv, base = server
    with torch.inference_mode():
        model, clip = tiny_sd2_model(0), tiny_sd2_clip(1)  # the server builds the same weights from the same seeds
    names = ("sd2_srv_a.safetensors", "sd2_srv_b.safetensors")
    for i, name in enumerate(names):
        lora = _loras.random_lora(model, clip, seed=50 + i, rank=4, alpha=2.0)
        for folder in (base / "models" / "loras", comfy_dirs["loras"]):  # the server's and this process's
            _loras.write_kohya(lora, folder / name)
    experts = load(mole, model, clip, *((n, 1.0, True) for n in names))
    _, _, fresh = apply(mole, model, experts, "gated", clip=clip)
    mole_core.write_gate_file(fresh.gate_file, base / "models" / "mole_gates" / "sd2.safetensors")
    for width, height, mask in ((64, 64, ""), (128, 128, ""), (96, 64, ""), (96, 64, "1, 0")):
        entry = srv.run(sized_graph("sd2", names, width, height, mask, gates_file="sd2.safetensors"))
        assert entry["status"]["status_str"] == "success", (width, height, mask, entry["status"])
        payload = entry["outputs"]["8"]["mole_gates"][0]
        assert payload["experts"] == list(names) and "mid.attn0" in payload["labels"], payload["labels"]
        assert entry["outputs"]["8"]["images"]


def _branch(family: str, model: list, clip: list, first: int, prefix: str, size: int = 64, steps: int = 3,
            latent: bool = False) -> dict:
    """Text encoding → KSampler (CFG 5, seed 0) → VAEDecode → SaveImage, ids from ``first``; ``latent``: SaveLatent
    (id ``first + 4``) instead of decoding."""
    ids = [str(first + i) for i in range(6)]
    save = {ids[4]: {"class_type": "SaveLatent", "inputs": {"samples": [ids[3], 0], "filename_prefix": prefix}}} \
        if latent else {
            ids[4]: {"class_type": "VAEDecode", "inputs": {"samples": [ids[3], 0], "vae": ["1", 2]}},
            ids[5]: {"class_type": "SaveImage", "inputs": {"images": [ids[4], 0], "filename_prefix": prefix}}}
    return {
        **_text_nodes(family, clip, first, size, size),
        ids[2]: {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        ids[3]: {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [ids[0], 0], "negative": [ids[1], 0], "latent_image": [ids[2], 0],
            "seed": 0, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        **save,
    }


@pytest.mark.parametrize("family", ["sdxl", "sd2"])
def test_static_and_nla_equal_chained_lora_loaders_on_the_server(server, comfy_dirs, family):
    """In one graph on the server: MoLE Apply (static 0.7 / 0.4, then NLA) and two chained core ``LoraLoader``s at
    the same strengths (UNet and text-encoder parts) give the same decoded image within 2/255; the LoRAs change it
    well beyond that."""
    import numpy as np
    from PIL import Image

    from tests.nodes.testing_pack.tiny_comfy import tiny_sd2_clip, tiny_sd2_model, tiny_sdxl_clip, tiny_sdxl_model

    srv, base = server
    with torch.inference_mode():
        model, clip = (tiny_sdxl_model(0), tiny_sdxl_clip(1)) if family == "sdxl" else \
            (tiny_sd2_model(0), tiny_sd2_clip(1))
    names = (f"{family}_eq_a.safetensors", f"{family}_eq_b.safetensors")
    for i, name in enumerate(names):
        lora = _loras.random_lora(model, clip, seed=70 + i, rank=4, alpha=2.0, scale=2.0)
        _loras.write_kohya(lora, base / "models" / "loras" / name)
    for mode, weights, strengths in (("static weights", "0.7, 0.4", (0.7, 0.4)), ("uniform (NLA)", "", (0.5, 0.5))):
        tag = f"{family}_{'static' if mode.startswith('static') else 'nla'}"
        g = {
            **_head(family, names, mode, weights),
            **_lora_loaders(names, strengths, 20),
            **_branch(family, ["3", 0], ["3", 1], 30, f"eq/{tag}_mole"),
            **_branch(family, ["21", 0], ["21", 1], 40, f"eq/{tag}_loraloader"),
            **_branch(family, ["1", 0], ["1", 1], 50, f"eq/{tag}_base"),
        }
        entry = srv.run(g)
        assert entry["status"]["status_str"] == "success", (family, mode, entry["status"])
        images = {}
        for node, label in (("35", "mole"), ("45", "loraloader"), ("55", "base")):
            saved = entry["outputs"][node]["images"][0]
            path = base / "output" / saved["subfolder"] / saved["filename"]
            images[label] = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
        assert np.abs(images["mole"] - images["loraloader"]).max() <= 2 / 255, (family, mode)
        assert np.abs(images["mole"] - images["base"]).max() > 20 / 255, (family, mode)  # the LoRAs act


@pytest.mark.parametrize("family", ["sd15", "sd2v", "sdxl"])
def test_single_file_checkpoint_mixes_equal_chained_lora_loaders_on_the_server(server, family):
    """A real-size SD1.5, SD2.x 768-v or SDXL single file (random weights, written by ComfyUI's checkpoint saver) in
    the server's ``models/checkpoints``: /object_info lists it, and in one graph CheckpointLoaderSimple → MoLE Apply
    (static 0.7 / 0.4, NLA, gated) and two chained core ``LoraLoader``s at the same strengths, with kohya LoRAs that
    have UNet and text-encoder parts (SDXL: ``lora_te1_`` and ``lora_te2_``, sampled with SDXL's size conditioning).
    Static and NLA equal the LoraLoaders within 2/255 on the sampled latents (the LoRAs change them by more than
    20/255); gated starts at NLA. Slow: the file is 4–5 GB (SDXL 14 GB: building it peaks at 14 GB in a process of
    its own, loading it at 12 GB in the server's), deleted at the end."""
    from tests.nodes.conftest import COMFYUI
    from tests.nodes.testing_pack import write_checkpoint
    from tests.nodes.testing_pack.real_size import weightless

    srv, base = server
    ckpt = base / "models" / "checkpoints" / f"single_{family}.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    names = (f"single_srv_{family}_a.safetensors", f"single_srv_{family}_b.safetensors")
    try:  # written by a process of its own: building SDXL's takes 14 GB, which this process would keep
        subprocess.run([sys.executable, write_checkpoint.__file__, str(COMFYUI), str(ckpt), family], check=True,
                       timeout=1200)
        # the server's file list is cached until the folder's mtime changes, which writing the file does
        info = srv.get("/object_info/CheckpointLoaderSimple")["CheckpointLoaderSimple"]
        assert ckpt.name in info["input"]["required"]["ckpt_name"][0]
        model, clip = weightless(family)  # names and shapes are enough for the LoRAs: the load only on the server
        for i, name in enumerate(names):
            lora = _loras.random_lora(model, clip, seed=60 + i, rank=4, alpha=2.0, scale=0.5)
            if family == "sdxl":  # every 8th layer in name order (UNet and both text encoders keep some): the
                # patched weight copies of a LoRA on every SDXL layer (~7 GB) on top of the 12 GB loaded model would
                # not fit in this machine's 24 GB
                lora = dataclasses.replace(lora, factors=dict(sorted(lora.factors.items())[::8]))
            assert lora.components() == ({"unet", "te", "te2"} if family == "sdxl" else {"unet", "te"})
            _loras.write_kohya(lora, base / "models" / "loras" / name)
        g = {
            **_head("sd2" if family == "sd2v" else family, names, "static weights", "0.7, 0.4"),
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt.name}},  # not the tiny model
            "4": _apply("uniform (NLA)"), "5": _apply("gated"),
            **_lora_loaders(names, (0.7, 0.4), 10), **_lora_loaders(names, (0.5, 0.5), 12),
        }
        sources = {"static": "3", "nla": "4", "gated": "5", "static_ref": "11", "nla_ref": "13", "base": "1"}
        for i, (label, node) in enumerate(sources.items()):
            g.update(_branch(family, [node, 0], [node, 1], 20 + 10 * i, f"single/{family}_{label}", steps=2,
                             latent=True))
        entry = srv.run(g, timeout=600)
        assert entry["status"]["status_str"] == "success", entry["status"]
    finally:
        ckpt.unlink(missing_ok=True)
        if family == "sdxl":  # unloaded, the SDXL still leaves 12 GB in the server's heap; the SDXL training step
            srv.restart()  # (test_training_sdxl_real.py, 14 GB in this process) would not fit beside them
        else:
            srv.free()  # the server would hold the loaded checkpoint (SD1.5: 7 GB resident) until its next graph
    latents = {}
    for i, label in enumerate(sources):
        saved = entry["outputs"][str(24 + 10 * i)]["latents"][0]
        latents[label] = load_file(base / "output" / saved["subfolder"] / saved["filename"])["latent_tensor"]
    for mix in ("static", "nla"):
        diff = float((latents[mix] - latents[f"{mix}_ref"]).abs().max())
        effect = float((latents[mix] - latents["base"]).abs().max())
        print(f"\nsingle-file {family} on the server, {mix}: MoLE vs LoraLoaders {diff:.2e}, LoRAs' effect "
              f"{effect:.1f}")
        assert diff <= 2 / 255, mix
        assert effect > 20 / 255, mix  # the mix acts well beyond the tolerance
    # gated (hooks) vs NLA (merged weights): equal up to rounding, measured against the experts' effect as in
    # test_single_file.py (random real-size weights amplify it)
    drift = float((latents["gated"] - latents["nla"]).norm() / (latents["nla"] - latents["base"]).norm())
    print(f"single-file {family} on the server: gated start vs NLA, {drift:.2e} of the experts' effect")
    assert drift <= 0.01
