"""MoLE Load Experts: chaining, limits, bad files, non-LoRA adapters."""

from __future__ import annotations

import comfy.lora
import pytest
import torch

from tests.nodes import _loras
from tests.nodes._nodes import apply, load

pytestmark = pytest.mark.comfy


def test_no_lora_is_a_clear_error(mole, tiny):
    import mole_core

    with pytest.raises(mole_core.MoleError, match="pick at least one LoRA"):
        load(mole, tiny[0], None)


def test_lora_for_another_model_family_matches_zero_targets(mole, tiny, comfy_dirs):
    import mole_core

    _loras.write_other_family(comfy_dirs["loras"] / "sdxl_style.safetensors")
    with pytest.raises(mole_core.MoleError, match=r"sdxl_style.safetensors: 0 of its LoRA modules match this SD15 "
                                                  r"— a LoRA for another model family\? \(e.g. .*640→640, layer"):
        load(mole, tiny[0], tiny[1], ("sdxl_style.safetensors", 1.0, True))


def test_chaining_keeps_order_and_caps_at_eight(mole, tiny, files):
    import mole_core

    model, _ = tiny
    four = [("a.safetensors", 1.0, True), ("b.safetensors", 0.5, False), ("c.safetensors", 1.0, True),
            ("a.safetensors", 2.0, True)]
    first = load(mole, model, None, *four)
    second = load(mole, model, None, *four, experts=first)
    assert [e.name for e in second.entries] == [n for n, _, _ in four] * 2
    assert [e.strength for e in second.entries][:4] == [1.0, 0.5, 1.0, 2.0]
    assert [e.enabled for e in second.entries][:2] == [True, False]
    with pytest.raises(mole_core.MoleError, match="at most 8 experts, got 9"):
        load(mole, model, None, ("c.safetensors", 1.0, True), experts=second)
    # ComfyUI puts str() of every input into error reports: payloads must print short
    assert len(str(second)) < 600 and "tensor(" not in str(second)
    assert str(second.entries[1]) == "b.safetensors (strength 0.5, off, 194 targets)"


@pytest.mark.parametrize("name, match", [("../a.safetensors", "no '..'"), ("weights.ckpt", "only .safetensors"),
                                         ("missing.safetensors", "not found in models/loras")])
def test_bad_lora_names(mole, tiny, name, match):
    import mole_core

    with pytest.raises(mole_core.MoleError, match=match):
        load(mole, tiny[0], None, (name, 1.0, True))


def test_loha_becomes_an_exact_dense_expert(mole, tiny, comfy_dirs):
    import mole_core

    model, _ = tiny
    path = _loras.write_loha(model, comfy_dirs["loras"] / "loha.safetensors")
    ex = load(mole, model, None, ("loha.safetensors", 1.0, True))
    ours = ex.entries[0].expert.factors
    with pytest.warns(mole_core.MoleWarning, match="LoHa"):
        engine = mole_core.load_expert(path).factors  # the engine's own LoHa parser
    assert set(ours) == set(engine) and len(ours) == 2
    for name in ours:
        assert torch.allclose(ours[name].delta().flatten(1), engine[name].delta().flatten(1), atol=1e-6), name
    static, _, _ = apply(mole, model, ex, "static weights", "0.5")
    key = ex.entries[0].model_keys["unet:mid_block.attentions.0.proj_in"]
    weight = model.model.diffusion_model.state_dict()[key[len("diffusion_model."):]].float()
    merged = comfy.lora.calculate_weight(static.patches[key], weight.clone(), key)
    expected = 0.5 * engine["unet:mid_block.attentions.0.proj_in"].delta()
    assert torch.allclose((merged - weight).flatten(1), expected, atol=1e-6)


def test_diffusers_file_alphas_from_lora_adapter_metadata(mole, tiny, comfy_dirs):
    import json

    from safetensors.torch import save_file

    import mole_core

    model, _ = tiny
    lora = _loras.random_lora(model, None, seed=7, rank=4, alpha=None, conv=False)
    sd = {}
    for name, (down, up) in lora.factors.items():
        key = "unet." + name.split(":", 1)[1]
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = down, up
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 2,
                                                 "unet.alpha_pattern": {"proj_in": 8}})}
    path = comfy_dirs["loras"] / "diffusers_meta.safetensors"
    save_file(sd, str(path), metadata=meta)
    ours = load(mole, model, None, ("diffusers_meta.safetensors", 1.0, True)).entries[0].expert.factors
    engine = mole_core.load_expert(path).factors
    assert set(ours) == set(engine)
    for name in ours:
        expected = 2.0 if name.endswith("proj_in") else 0.5
        assert ours[name].scale == pytest.approx(expected), name
        assert torch.allclose(ours[name].delta().flatten(1), engine[name].delta().flatten(1), atol=1e-6), name
