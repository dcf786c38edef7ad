"""Gate files cross between the CLI side (engine on a diffusers UNet) and the ComfyUI nodes.

The diffusers UNet has the tiny ComfyUI model's topology and, through ``comfy.utils.unet_to_diffusers``,
its very weights, so not only names and feature sizes but the outputs of both mixtures are compared.
"""

from __future__ import annotations

import comfy.model_management
import comfy.utils
import pytest
import torch

from tests.nodes._helpers import diffusers_twin
from tests.nodes._nodes import apply, load, load_gates, random_gates, rel

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def diffusers_unet(tiny):
    pytest.importorskip("diffusers")
    return diffusers_twin(tiny[0])


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(21)
    return torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([700.0, 300.0]), torch.randn(2, 7, 32, generator=gen)


def comfy_forward(m, inputs, gates_of=None):
    """The UNet call as ComfyUI's BaseModel makes it (``context=`` keyword); with ``gates_of`` (a mixture),
    also that call's live gates (the mixture forgets them when ComfyUI unloads the model)."""
    x, t, ctx = inputs
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        comfy.model_management.load_models_gpu([m])
        try:
            out = m.model.diffusion_model(x, timesteps=t, context=ctx)
            return out if gates_of is None else (out, {k: v.clone() for k, v in gates_of.live_gates.items()})
        finally:
            comfy.model_management.unload_all_models()


def diffusers_forward(unet, inputs):
    x, t, ctx = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


@pytest.mark.parametrize("gate_input", ["input", "prompt"])
def test_cli_gate_file_loads_in_mole_load_gates(mole, tiny, files, experts, comfy_dirs, diffusers_unet, inputs,
                                                gate_input):
    import mole_core

    cli_experts = mole_core.load_experts([files["a"], files["b"]])
    mix = mole_core.attach(diffusers_unet, cli_experts, mole_core.GateConfig(init_std=0.5, gate_input=gate_input))
    try:
        mole_core.save_gates(mix, comfy_dirs["mole_gates"] / f"cli_{gate_input}.safetensors")
        reference = diffusers_forward(diffusers_unet, inputs)
        reference_gates = {k: v.clone() for k, v in mix.live_gates.items()}
    finally:
        mix.detach()
    gates = load_gates(mole, f"cli_{gate_input}.safetensors")
    m, _, live = apply(mole, tiny[0], experts, "gated", gates=gates)
    comfy_mix = live.holders[0].mix
    assert comfy_mix.config.gate_input == gate_input
    assert {s: v.feature_dim for s, v in comfy_mix.scopes.items()} == \
        {s: int(v["feature_dim"]) for s, v in gates.gate_file.scopes.items()}
    out, comfy_gates = comfy_forward(m, inputs, gates_of=comfy_mix)
    assert rel(out, reference) <= 1e-4
    assert set(comfy_gates) == set(reference_gates)
    for scope, g in reference_gates.items():  # ComfyUI's `context` reaches the gates like diffusers' states
        torch.testing.assert_close(comfy_gates[scope].float().cpu(), g, atol=1e-5, rtol=1e-4)
    assert rel(diffusers_forward(diffusers_unet, inputs), reference) > 1e-3  # hooks gone: bare UNet differs


def test_gate_file_saved_by_comfy_loads_in_the_cli(mole, tiny, files, experts, comfy_dirs, diffusers_unet, inputs):
    import mole_core

    gates = random_gates(mole, tiny[0], experts, comfy_dirs["mole_gates"], "for_cli_in.safetensors", std=0.5)
    m, _, live = apply(mole, tiny[0], experts, "gated", gates=gates)
    with torch.inference_mode():
        mole.gates.MoleSaveGates.execute(gates=live, filename="for_cli", overwrite=True)
    ours = comfy_forward(m, inputs)
    cli_experts = mole_core.load_experts([files["a"], files["b"]])
    with mole_core.attach(diffusers_unet, cli_experts, gates=comfy_dirs["mole_gates"] / "for_cli.safetensors"):
        reference = diffusers_forward(diffusers_unet, inputs)
    assert rel(ours, reference) <= 1e-4


def test_cli_and_node_record_the_same_timestep_buckets(mole, tiny, files, experts, comfy_dirs, diffusers_unet,
                                                       inputs):
    """One bucket direction everywhere (bucket 0 = the noisiest steps): the CLI's sampling hook and MoLE
    Apply's wrapper file the same calls under the same buckets, with the same labels."""
    import mole_core
    from train.sampling import bucket_hook

    gates = random_gates(mole, tiny[0], experts, comfy_dirs["mole_gates"], "buckets.safetensors", std=0.5)
    x, _, ctx = inputs
    calls = [torch.tensor([900.0, 900.0]), torch.tensor([100.0, 100.0])]
    mix = mole_core.attach(diffusers_unet, mole_core.load_experts([files["a"], files["b"]]), gates=gates.gate_file)
    hook = diffusers_unet.register_forward_pre_hook(bucket_hook(mix, 4, 1000), with_kwargs=True)
    try:
        with torch.no_grad():
            for t in calls:
                diffusers_unet(x, t, encoder_hidden_states=ctx)
        cli = mix.stats.summary()
    finally:
        hook.remove()
        mix.detach()
    m, _, live = apply(mole, tiny[0], experts, "gated", gates=gates, buckets=4)
    holder = live.holders[0]
    holder.reset()
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        comfy.model_management.load_models_gpu([m])
        try:
            for t in calls:
                holder.diffusion_model_wrapper(m.model.diffusion_model, x, t, context=ctx, transformer_options={})
        finally:
            comfy.model_management.unload_all_models()
    node = holder.finish_run()
    assert sorted(cli["by_bucket"]) == sorted(node["by_bucket"]) == ["0", "3"]  # t 900: bucket 0; t 100: bucket 3
    assert node["bucket_labels"]["0"] == mole_core.stats.bucket_label(0, 4) == "t 1000-750"
    for b in ("0", "3"):
        for scope, g in cli["by_bucket"][b].items():
            torch.testing.assert_close(torch.tensor(node["by_bucket"][b][scope]), torch.tensor(g), atol=1e-4, rtol=1e-4)


LISTS = ["0.5, 1", "0.5 1", "0.5;1", " 2,  -0.25 ", "1e-1,3", "x, 1", "1,,2", "1 two", ""]  # the values' range:
# SampleSpec on the CLI side, tests/train/test_methods.py
SWITCH_LISTS = ["1,0,1", "on off on", "true;false;yes", "1, 0, 0", "0,0,0", "1,2,0", "ON, Off, no"]


def _cli_value(flag: str, text: str, capsys) -> object:  # noqa: ANN001
    """What the CLI's own parser makes of ``--flag text``, or ``"error: <message>"`` when it refuses it."""
    from train.cli import build_parser

    argv = ["sample", "--base", "b", "--lora", "l", "--prompt", "p", flag, text]
    try:
        return getattr(build_parser().parse_args(argv), flag.lstrip("-"))
    except SystemExit:
        return "error: " + capsys.readouterr().err.strip().splitlines()[-1].split(f"argument {flag}: ", 1)[1]


@pytest.mark.parametrize("text", LISTS)
def test_weights_grammar_is_the_same_in_the_cli_and_the_nodes(mole, text, capsys):
    import mole_core

    try:
        node = mole.common.parse_floats(text, "weights")
    except mole_core.MoleError as exc:
        node = "error: " + str(exc).replace("`weights`", "value")
    assert _cli_value("--weights", text, capsys) == node


@pytest.mark.parametrize("text", SWITCH_LISTS)
def test_mask_grammar_is_the_same_in_the_cli_and_the_nodes(mole, text, capsys):
    import mole_core

    try:
        node = mole.common.parse_mask(text, [True] * 3, ["a", "b", "c"])
    except mole_core.MoleError as exc:
        node = "error: " + str(exc).replace("`mask`", "value")
    assert _cli_value("--mask", text, capsys) == node


_KIND_LABELS = {"dora": "DoRA", "loha": "LoHa", "loha_tucker": "LoHa", "lokr": "LoKr", "glora": "GLoRA", "oft": "OFT",
                "boft": "BOFT", "dora_loha": r"DoRA \(LoHa\)"}


@pytest.mark.parametrize("kind", list(_KIND_LABELS))
def test_every_lora_kind_equals_comfyui_in_the_cli_and_the_nodes(mole, tiny, comfy_dirs, diffusers_unet, inputs, kind):
    """Every LoRA kind the nodes read through ComfyUI's adapters besides plain LoRA — DoRA (magnitudes on the output
    and the input axis, a 1×1 conv among its layers), LoHa (plain; with Tucker cores), LoKr, GLoRA in both layouts,
    OFT with and without its norm constraint, BOFT with rescale, DoRA on LoHa; each on a Linear and a conv:
    ComfyUI's own LoraLoader, MoLE's nodes (static weight) and the CLI's engine on the diffusers UNet of the same
    weights give the same UNet output, at strength 1 and 0.6 (the delta scales linearly in ComfyUI) — at 1 only
    for OFT and BOFT: ComfyUI applies their strength inside the rotation (OFT: s²·ΔW), the engine and the nodes'
    gates scale the strength-1 delta linearly."""
    import mole_core
    from tests.nodes import _loras
    from tests.nodes._helpers import lora_loader

    model, _ = tiny
    target = comfy_dirs["loras"] / f"cross_{kind}.safetensors"
    if kind in ("dora", "loha"):
        path = (_loras.write_dora if kind == "dora" else _loras.write_loha)(model, target, seed=7)
    else:
        path = _loras.write_lycoris(model, target, kind, seed=11)
    with pytest.warns(mole_core.MoleWarning, match=_KIND_LABELS[kind]):
        engine_expert = mole_core.load_expert(path)
    assert len(engine_expert.factors) == {"dora": len(_loras.DORA_MODULES), "glora": 3}.get(kind, 2)
    bare = comfy_forward(model, inputs)
    ex = load(mole, model, None, (path.name, 1.0, True))
    for strength in (1.0,) if kind in ("oft", "boft") else (1.0, 0.6):
        oracle = comfy_forward(lora_loader(model, None, path, strength)[0], inputs)
        assert rel(oracle, bare) > 1e-3  # the expert changes the output well beyond the tolerance below
        nodes_out = comfy_forward(apply(mole, model, ex, "static weights", f"{strength}")[0], inputs)
        with mole_core.attach(diffusers_unet, [engine_expert], mode="static", weights=[strength]):
            cli_out = diffusers_forward(diffusers_unet, inputs)
        assert rel(nodes_out, oracle) <= 1e-5, (kind, strength)
        assert rel(cli_out, oracle) <= 1e-5, (kind, strength)
