"""API-format sources of the example workflows in ``workflows/`` and their tiny-model substitution.

``python -m tests.ui.export_workflows`` turns these into the UI-format files (through the real
frontend); the tests load those files in a browser and run the API graphs, with the tiny test-pack
nodes in place of the checkpoint loader and the image loaders, on a headless server.
"""

from __future__ import annotations

import copy

CHECKPOINT = "sd15_base.safetensors"   # placeholders the user replaces
LORAS = ("style_a.safetensors", "subject_b.safetensors")
GATES = "my_mole.safetensors"
PROMPT = "a photo of subject B in style A"
NEGATIVE = "blurry, low quality"


def _node(class_type: str, title: str | None = None, **inputs: object) -> dict:
    node: dict = {"class_type": class_type, "inputs": inputs}
    if title:
        node["_meta"] = {"title": title}
    return node


def _base() -> dict:
    experts = {"model": ["1", 0], "clip": ["1", 1]}
    for i in range(1, 5):
        experts.update({f"lora_{i}": LORAS[i - 1] if i <= len(LORAS) else "None", f"strength_{i}": 1.0,
                        f"on_{i}": True})
    return {"1": _node("CheckpointLoaderSimple", "Load Checkpoint (your SD1.5 / SDXL model)", ckpt_name=CHECKPOINT),
            "2": _node("MoLE_LoadExperts", "MoLE Load Experts (your LoRAs)", **experts)}


def _sampler(graph: dict, first: str, model: list, clip: list, prefix: str, title: str) -> None:
    a, b, c, d, e = (str(int(first) + i) for i in range(5))
    graph.update({
        a: _node("CLIPTextEncode", f"{title}: prompt", clip=clip, text=PROMPT),
        b: _node("CLIPTextEncode", f"{title}: negative", clip=clip, text=NEGATIVE),
        c: _node("KSampler", title, model=model, positive=[a, 0], negative=[b, 0], latent_image=["9", 0], seed=42,
                 steps=25, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0),
        d: _node("VAEDecode", samples=[c, 0], vae=["1", 2]),
        e: _node("SaveImage", title, images=[d, 0], filename_prefix=prefix),
    })


def train_gates() -> dict:
    """Reference images → MoLE Train Gates → heatmap and loss curves."""
    g = _base()
    g.update({
        "3": _node("LoadImage", "Reference image 1", image="reference_1.png"),
        "4": _node("LoadImage", "Reference image 2", image="reference_2.png"),
        "5": _node("ImageBatch", image1=["3", 0], image2=["4", 0]),
        "6": _node("MoLE_TrainGates", model=["1", 0], clip=["1", 1], vae=["1", 2], experts=["2", 0], images=["5", 0],
                   prompts=PROMPT, steps=200, lr=0.005, alpha=0.5, granularity="block", gate_input="input",
                   objective="denoise", seed=0, name=GATES.removesuffix(".safetensors"), run="wait", resolution=512,
                   batch_size=2),
        "7": _node("MoLE_VisualizeGates", gates=["6", 0], by_timestep=True, scale=2),
        "8": _node("PreviewImage", "Loss and gate-entropy curves", images=["6", 1]),
    })
    return g


def sample_with_gates() -> dict:
    """Trained gates from models/mole_gates → MoLE Apply (gated) → KSampler, plus the heatmap of the run."""
    g = _base()
    g["3"] = _node("MoLE_LoadGates", gate_file=GATES)
    g["4"] = _node("MoLE_Apply", model=["1", 0], clip=["1", 1], experts=["2", 0], gates=["3", 0], mode="gated",
                   strength=1.0, weights="", mask="", timestep_buckets=4)
    g["9"] = _node("EmptyLatentImage", width=512, height=512, batch_size=1)
    _sampler(g, "10", ["4", 0], ["4", 1], "mole/gated", "MoLE (learned gates)")
    g["20"] = _node("MoLE_VisualizeGates", gates=["4", 2], by_timestep=True, scale=2, samples=["12", 0])
    return g


def mole_vs_nla() -> dict:
    """The same seed through learned gates and through uniform NLA weights, side by side."""
    g = _base()
    g["3"] = _node("MoLE_LoadGates", gate_file=GATES)
    g["4"] = _node("MoLE_Apply", "MoLE Apply (learned gates)", model=["1", 0], clip=["1", 1], experts=["2", 0],
                   gates=["3", 0], mode="gated", strength=1.0, weights="", mask="", timestep_buckets=4)
    g["5"] = _node("MoLE_Apply", "MoLE Apply (NLA: 1/N each)", model=["1", 0], clip=["1", 1], experts=["2", 0],
                   mode="uniform (NLA)", strength=1.0, weights="", mask="", timestep_buckets=4)
    g["9"] = _node("EmptyLatentImage", width=512, height=512, batch_size=1)
    _sampler(g, "10", ["4", 0], ["4", 1], "mole/vs_nla_mole", "MoLE")
    _sampler(g, "15", ["5", 0], ["5", 1], "mole/vs_nla_nla", "NLA")
    return g


def bake() -> dict:
    """Merge the gates' mean per block into the weights (zero sampling cost) and save one standard LoRA."""
    g = _base()
    g["3"] = _node("MoLE_LoadGates", gate_file=GATES)
    g["4"] = _node("MoLE_Bake", model=["1", 0], clip=["1", 1], experts=["2", 0], gates=["3", 0],
                   weights_from="recorded gate statistics", weights="", strength=1.0, save_lora=True,
                   filename_prefix="mole/baked")
    g["9"] = _node("EmptyLatentImage", width=512, height=512, batch_size=1)
    _sampler(g, "10", ["4", 0], ["4", 1], "mole/baked", "Baked MoLE")
    g["20"] = _node("PreviewAny", "LoRA block weights (Inspire-Pack format)", source=["4", 2])
    return g


EXAMPLES = {"mole_train_gates": train_gates, "mole_sample_with_gates": sample_with_gates,
            "mole_vs_nla": mole_vs_nla, "mole_bake": bake}

NOTES = {
    "mole_train_gates": "Train MoLE gates from reference images.\n\n1. Pick your checkpoint and 2-4 LoRAs "
                        "(models/loras).\n2. Load 2+ reference images (ComfyUI/input) and describe them in "
                        "`prompts` (one line for all, or one per image).\n3. Queue. The panel on MoLE Train Gates "
                        "shows loss, gate entropy and the mean gate per expert live; Cancel keeps a checkpoint, "
                        "Resume continues it.\n\nrun = wait: the node waits and passes the trained gates on (heatmap "
                        "below). run = background: the queue stays free; the gates are written to "
                        "models/mole_gates/<name>.safetensors for MoLE Load Gates.",
    "mole_sample_with_gates": "Sample with trained gates: MoLE Load Gates reads models/mole_gates/<name>.safetensors "
                              "(from MoLE Train Gates or the CLI). The experts must be the same LoRAs, in the same "
                              "order. The heatmap shows which expert each block used in this run.",
    "mole_vs_nla": "MoLE vs NLA: the same prompt and seed with learned gates (left) and with every expert at 1/N "
                   "(normalised linear arithmetic, right).",
    "mole_bake": "Bake: the gates' mean per block (recorded on the references during training) becomes fixed "
                 "per-block LoRA strengths merged into the weights: no cost while sampling. save_lora also writes "
                 "one standard LoRA to models/loras/mole/.",
}


def tiny(graph: dict, loras: tuple[str, str] = ("a.safetensors", "b.safetensors"), gates: str | None = None,
         steps: int = 3, size: int = 64) -> dict:
    """The graph on the test pack's tiny model: checkpoint → MoLETestTinyModel, images → MoLETestBlobs,
    tiny sizes and step counts."""
    g = copy.deepcopy(graph)
    for node_id, node in g.items():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            node.update(class_type="MoLETestTinyModel", inputs={"seed": 0})
        elif kind == "LoadImage":
            node.update(class_type="MoLETestBlobs", inputs={"count": 2, "size": size, "seed": int(node_id)})
        elif kind == "MoLE_LoadExperts":
            inputs.update(lora_1=loras[0], lora_2=loras[1])
        elif kind == "MoLE_LoadGates" and gates:
            inputs["gate_file"] = gates
        elif kind == "MoLE_TrainGates":
            inputs.update(steps=steps, resolution=size, batch_size=2)
        elif kind == "KSampler":
            inputs["steps"] = steps
        elif kind == "EmptyLatentImage":
            inputs.update(width=size, height=size)
    return g
