"""Sanity checks of the shared fixtures: models build and run offline, the tokenizer matches
open_clip, every LoRA format holds the same tensors, the diffusers oracle equals hand-merging,
broken files are broken."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from tests.fixtures import comfy_check, oracle
from tests.fixtures import lora_writers as lw
from tests.fixtures.ldm_names import SD15_TOPOLOGY, UNetTopology, to_ldm
from tests.fixtures.sets import LoraSet, SameLora

TOL = 1e-5


# --- tokenizer ---------------------------------------------------------------------------------


def test_byte_table_matches_open_clip() -> None:
    from open_clip.tokenizer import bytes_to_unicode

    from tests.fixtures.tokenizer import byte_to_unicode

    assert list(byte_to_unicode().items()) == list(bytes_to_unicode().items())


@pytest.mark.parametrize("text", ["a photo of a cat", "A Painting of Mount Fuji, Hokusai!! 123 naïve café <3"])
def test_tokenizer_matches_open_clip(clip_tokenizer_dir: Path, text: str) -> None:
    import open_clip
    from transformers import CLIPTokenizer

    from tests.fixtures.tokenizer import make_clip_tokenizer

    reference = open_clip.tokenize([text])[0].tolist()
    end = reference.index(49407) + 1  # open_clip pads with 0 after EOT, HF with 49407
    for tok in (make_clip_tokenizer(clip_tokenizer_dir), CLIPTokenizer.from_pretrained(clip_tokenizer_dir)):
        ids = tok(text, padding="max_length", max_length=77).input_ids
        assert len(ids) == 77 and tok.model_max_length == 77 and tok.pad_token_id == 49407
        assert ids[:end] == reference[:end]
        assert set(ids[end:]) <= {49407}


# --- tiny models -------------------------------------------------------------------------------


def test_tiny_sd15_topology(tiny_sd15: dict[str, Any]) -> None:
    unet = tiny_sd15["unet"]
    modules = dict(unet.named_modules())
    assert isinstance(modules["mid_block.attentions.0.proj_in"], torch.nn.Conv2d)
    assert modules["down_blocks.0.resnets.0.conv1"].kernel_size == (3, 3)
    assert "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k" in modules
    assert not any(p.ndim >= 2 and not torch.any(p) for p in unet.parameters())
    names = [n for n, _ in tiny_sd15["text_encoder"].named_modules()]
    assert "encoder.layers.0.self_attn.q_proj" in names  # transformers 5: no `text_model.` level


def test_tiny_models_deterministic(tiny_sd15: dict[str, Any]) -> None:
    from tests.fixtures.tiny_models import tiny_sd15_unet

    again = tiny_sd15_unet(0).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in tiny_sd15["unet"].state_dict().items())
    assert not torch.equal(tiny_sd15_unet(1).state_dict()["conv_in.weight"], again["conv_in.weight"])


def test_tiny_sdxl_topology(tiny_sdxl: dict[str, Any]) -> None:
    modules = dict(tiny_sdxl["unet"].named_modules())
    assert isinstance(modules["down_blocks.1.attentions.0.proj_in"], torch.nn.Linear)
    assert "down_blocks.2.attentions.1.transformer_blocks.1.attn1.to_q" in modules  # depth 2
    assert "down_blocks.0.attentions.0.proj_in" not in modules  # DownBlock2D first, like SDXL
    te2 = [n for n, _ in tiny_sdxl["text_encoder_2"].named_modules()]
    assert "text_model.encoder.layers.0.self_attn.q_proj" in te2  # WithProjection keeps `text_model.`


def _generate(pipe: Any) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="pt", generator=gen).images


def test_sd15_folder_loads_offline_and_runs(tiny_sd15_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    assert {"model_index.json", "unet", "text_encoder", "vae", "tokenizer", "scheduler"} <= {
        p.name for p in tiny_sd15_dir.iterdir()}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = _generate(pipe)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all() and images.std() > 0


def test_sdxl_folder_loads_offline_and_runs(tiny_sdxl_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = _generate(pipe)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all() and images.std() > 0


# --- PEFT LoRAs and writers ---------------------------------------------------------------------


def test_random_peft_lora_shapes_and_size(same_lora_all_formats: SameLora, tiny_sd15: dict[str, Any]) -> None:
    lora = same_lora_all_formats.unet
    sd = lora.state_dict
    conv = "down_blocks.0.resnets.0.conv1"
    assert sd[f"{conv}.lora_A.weight"].shape == (4, 32, 3, 3) and sd[f"{conv}.lora_B.weight"].shape == (32, 4, 1, 1)
    assert sd["mid_block.attentions.0.proj_in.lora_A.weight"].shape == (4, 64, 1, 1)
    weights = dict(tiny_sd15["unet"].named_parameters())
    for module in lora.modules:
        ratio = lora.delta(module).norm() / weights[f"{module}.weight"].norm()
        assert ratio == pytest.approx(0.2, rel=1e-3)


def test_peft_writer_matches_real_save_pretrained(tmp_path: Path, same_lora_all_formats: SameLora,
                                                  tiny_sd15: dict[str, Any]) -> None:
    """Our PEFT folder has the keys, tensors and config a real ``PeftModel.save_pretrained`` writes."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    te = same_lora_all_formats.te
    model = get_peft_model(oracle.copy_components(tiny_sd15)["text_encoder"],
                           LoraConfig(r=te.rank, lora_alpha=te.alpha, target_modules=te.target_modules))
    result = set_peft_model_state_dict(model, {f"base_model.model.{k}": v for k, v in te.state_dict.items()})
    assert not result.unexpected_keys
    model.save_pretrained(tmp_path / "real")
    real = load_file(tmp_path / "real" / "adapter_model.safetensors")
    ours_dir = same_lora_all_formats.paths["peft"] / "text_encoder"
    ours = load_file(ours_dir / "adapter_model.safetensors")
    assert real.keys() == ours.keys()
    assert all(torch.equal(real[k], ours[k]) for k in real)
    cfg = json.loads((ours_dir / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", te.rank, te.alpha)


def _expected_keys(fmt: str, component: str, module: str) -> tuple[str, str, str | None]:
    """(down key, up key, alpha key) written independently of the writers' own code paths."""
    te_module = lw.legacy_te_name(module)
    if fmt == "kohya":
        base = f"lora_unet_{module}" if component == "unet" else f"lora_te_{te_module}"
        base = base.replace(".", "_")
        return f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"
    if fmt == "comfy":
        base = (f"diffusion_model.{to_ldm(module)}" if component == "unet"
                else f"text_encoders.clip_l.transformer.{te_module}")
        return f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"
    if fmt == "diffusers":
        base = f"unet.{module}" if component == "unet" else f"text_encoder.{te_module}"
        return f"{base}.lora_A.weight", f"{base}.lora_B.weight", None
    base = f"base_model.model.{module}"
    return f"{base}.lora_A.weight", f"{base}.lora_B.weight", None


def _read(fmt: str, path: Path, component: str) -> dict[str, torch.Tensor]:
    if fmt == "peft":
        return load_file(path / component / "adapter_model.safetensors")
    return load_file(path)


@pytest.mark.parametrize("fmt", lw.FORMATS)
def test_all_formats_hold_the_same_lora(same_lora_all_formats: SameLora, fmt: str) -> None:
    same = same_lora_all_formats
    path = same.paths[fmt]
    n_keys = 0
    for component, lora in (("unet", same.unet), ("text_encoder", same.te)):
        sd = _read(fmt, path, component)
        for module in lora.modules:
            down, up, alpha = _expected_keys(fmt, component, module)
            assert torch.equal(sd[down], lora.state_dict[f"{module}.lora_A.weight"]), down
            assert torch.equal(sd[up], lora.state_dict[f"{module}.lora_B.weight"]), up
            if alpha is not None:
                assert float(sd[alpha]) == lora.alpha
        n_keys += len(sd) if fmt == "peft" else 0
    total = sum(len(x.modules) for x in (same.unet, same.te))
    if fmt == "peft":
        assert n_keys == 2 * total
    else:
        assert len(load_file(path)) == total * (2 if fmt == "diffusers" else 3)


def test_alpha_storage_per_format(same_lora_all_formats: SameLora, tmp_path: Path) -> None:
    meta = lw.diffusers_alpha_metadata(same_lora_all_formats.paths["diffusers"])
    assert meta["unet.lora_alpha"] == 2.0 and meta["unet.r"] == 4 and meta["text_encoder.lora_alpha"] == 2.0
    sd = same_lora_all_formats.unet.state_dict
    plain = lw.write_diffusers(tmp_path / "plain.safetensors", sd)
    assert lw.diffusers_alpha_metadata(plain) == {}
    kohya = load_file(lw.write_kohya(tmp_path / "k.safetensors", sd))  # the tool's own alpha = rank
    alphas = {v.item() for k, v in kohya.items() if k.endswith(".alpha")}
    assert alphas == {4}
    comfy = load_file(lw.write_comfy(tmp_path / "c.safetensors", sd, flat_conv=True))  # extractor: no alpha
    assert not any(k.endswith(".alpha") for k in comfy)
    assert comfy["diffusion_model.input_blocks.1.0.in_layers.2.lora_down.weight"].shape == (4, 32 * 9)


# --- oracle ------------------------------------------------------------------------------------


def _merged_outputs(components: dict[str, Any], pairs: list[tuple[lw.PeftLora, lw.PeftLora | None, float]]):
    unet = oracle.hand_merged(components["unet"], [(u.state_dict, w * u.scale) for u, _, w in pairs])
    te = oracle.hand_merged(components["text_encoder"], [(t.state_dict, w * t.scale) for _, t, w in pairs if t])
    return unet, te


def test_oracle_kohya_equals_hand_merge(tiny_sd15: dict[str, Any], same_lora_all_formats: SameLora) -> None:
    same, s = same_lora_all_formats, 0.7
    ids = oracle.prompt_ids(tiny_sd15["tokenizer"])
    unet, te = oracle.diffusers_static_mixture(tiny_sd15, [same.paths["kohya"]], [s])
    ref_unet, ref_te = _merged_outputs(tiny_sd15, [(same.unet, same.te, s)])
    base = oracle.unet_forward(tiny_sd15["unet"])
    expected = oracle.unet_forward(ref_unet)
    assert (expected - base).norm() > 0.05 * base.norm()  # the LoRA visibly changes the output
    torch.testing.assert_close(oracle.unet_forward(unet), expected, atol=TOL, rtol=0)
    torch.testing.assert_close(oracle.text_encoder_forward(te, ids), oracle.text_encoder_forward(ref_te, ids),
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("fmt", ["diffusers", "peft"])
def test_oracle_other_formats_agree(tiny_sd15: dict[str, Any], same_lora_all_formats: SameLora, fmt: str) -> None:
    same = same_lora_all_formats
    unet, te = oracle.diffusers_static_mixture(tiny_sd15, [same.paths[fmt]], [1.0])
    ref_unet, ref_te = _merged_outputs(tiny_sd15, [(same.unet, same.te, 1.0)])
    ids = oracle.prompt_ids(tiny_sd15["tokenizer"])
    torch.testing.assert_close(oracle.unet_forward(unet), oracle.unet_forward(ref_unet), atol=TOL, rtol=0)
    torch.testing.assert_close(oracle.text_encoder_forward(te, ids), oracle.text_encoder_forward(ref_te, ids),
                               atol=TOL, rtol=0)


def test_oracle_mixture_of_lora_set(tiny_sd15_dir: Path, tiny_sd15: dict[str, Any], lora_set: LoraSet) -> None:
    assert lora_set.ranks == [4, 8, 16] and lora_set.alphas == [2.0, 8.0, 32.0]
    weights = [0.5, 1.0, 0.25]
    unet, te = oracle.diffusers_static_mixture(tiny_sd15_dir, lora_set.paths, weights)
    ref_unet, ref_te = _merged_outputs(tiny_sd15, [(e.unet, e.te, w) for e, w in zip(lora_set.experts, weights)])
    ids = oracle.prompt_ids(tiny_sd15["tokenizer"])
    torch.testing.assert_close(oracle.unet_forward(unet), oracle.unet_forward(ref_unet), atol=TOL, rtol=0)
    torch.testing.assert_close(oracle.text_encoder_forward(te, ids), oracle.text_encoder_forward(ref_te, ids),
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("index", [0, 1], ids=["kohya_ldm", "diffusers"])
def test_sdxl_lora_oracle(tiny_sdxl: dict[str, Any], sdxl_lora: LoraSet, index: int) -> None:
    expert, s = sdxl_lora[index], 0.8
    keys = load_file(expert.path).keys()
    if expert.format == "kohya":
        assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in keys)
        assert any(k.startswith("lora_te2_text_model_encoder_layers_0_") for k in keys)
    pipe = oracle.diffusers_lora_pipeline(tiny_sdxl, [expert.path], [s])
    merged = {
        name: oracle.hand_merged(tiny_sdxl[name], [(lora.state_dict, s * lora.scale)])
        for name, lora in (("unet", expert.unet), ("text_encoder", expert.te), ("text_encoder_2", expert.te2))
    }
    torch.testing.assert_close(oracle.unet_forward(pipe.unet), oracle.unet_forward(merged["unet"]), atol=TOL, rtol=0)
    ids = oracle.prompt_ids(tiny_sdxl["tokenizer"])
    for name in ("text_encoder", "text_encoder_2"):
        got = oracle.text_encoder_forward(getattr(pipe, name), ids)
        torch.testing.assert_close(got, oracle.text_encoder_forward(merged[name], ids), atol=TOL, rtol=0)


# --- names -------------------------------------------------------------------------------------


def test_ldm_names_examples() -> None:
    assert to_ldm("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") == (
        "input_blocks.4.1.transformer_blocks.0.attn2.to_k")
    assert to_ldm("down_blocks.0.resnets.0.conv1") == "input_blocks.1.0.in_layers.2"
    assert to_ldm("mid_block.attentions.0.proj_in") == "middle_block.1.proj_in"
    assert to_ldm("up_blocks.1.attentions.2.proj_out") == "output_blocks.5.1.proj_out"
    assert to_ldm("up_blocks.0.upsamplers.0.conv", SD15_TOPOLOGY) == "output_blocks.2.1.conv"
    with pytest.raises(KeyError):
        to_ldm("double_blocks.0.img_attn.qkv")


_COMFY = comfy_check.find_comfyui_root()
needs_comfy = pytest.mark.skipif(_COMFY is None, reason="no ComfyUI checkout: set $COMFYUI_PATH or use ~/ComfyUI")

_LDM_CONFIGS = {
    "sd15": dict(num_res_blocks=[2] * 4, channel_mult=[1, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1),
    "sdxl": dict(num_res_blocks=[2] * 3, channel_mult=[1, 2, 2], transformer_depth=[0, 0, 1, 1, 2, 2],
                 transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], transformer_depth_middle=2),
}


@pytest.mark.comfy
@needs_comfy
def test_ldm_names_match_comfyui(tiny_sd15: dict[str, Any], tiny_sdxl: dict[str, Any]) -> None:
    maps = comfy_check.comfy_unet_to_diffusers(_COMFY, list(_LDM_CONFIGS.values()))
    for unet, cmap in zip((tiny_sd15["unet"], tiny_sdxl["unet"]), maps):
        topology = UNetTopology.from_config(unet.config)
        keys = list(unet.state_dict())
        assert all(cmap[k] == to_ldm(k, topology) for k in keys)


@pytest.mark.comfy
@needs_comfy
def test_comfyui_reads_comfy_and_lycoris_files(tmp_path: Path, same_lora_all_formats: SameLora,
                                               tiny_sd15: dict[str, Any]) -> None:
    """ComfyUI's own adapters compute the deltas we claim for comfy (4-D and flat conv), LoHa and LoKr files."""
    weights = dict(tiny_sd15["unet"].named_parameters())
    lora = same_lora_all_formats.unet
    flat = lw.write_comfy(tmp_path / "flat.safetensors", lora.state_dict, alpha=lora.alpha, flat_conv=True)
    lora_entries = [(f"diffusion_model.{to_ldm(m)}", weights[f"{m}.weight"].shape) for m in lora.modules]
    lycoris = {}
    for write, delta in ((lw.write_loha, lw.loha_delta), (lw.write_lokr, lw.lokr_delta)):
        sd = load_file(write(tmp_path / f"{write.__name__}.safetensors"))
        lycoris[tmp_path / f"{write.__name__}.safetensors"] = (sd, delta, sorted({k.rsplit(".", 1)[0] for k in sd}))
    jobs = [(same_lora_all_formats.paths["comfy"], lora_entries), (flat, lora_entries)]
    jobs += [(path, [(p, (32, 32)) for p in prefixes]) for path, (_, _, prefixes) in lycoris.items()]
    results = comfy_check.comfy_deltas(_COMFY, jobs)
    for got in results[:2]:
        for (prefix, _), module in zip(lora_entries, lora.modules):
            torch.testing.assert_close(got[prefix], lora.delta(module), atol=1e-6, rtol=1e-5)
    for got, (sd, delta, prefixes) in zip(results[2:], lycoris.values()):
        for p in prefixes:
            torch.testing.assert_close(got[p], delta(sd, p), atol=1e-6, rtol=1e-5)


def test_lycoris_conventions(tmp_path: Path) -> None:
    loha = load_file(lw.write_loha(tmp_path / "loha.safetensors", rank=4, alpha=2.0))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    w1 = loha[f"{key}.hada_w1_a"] @ loha[f"{key}.hada_w1_b"]
    w2 = loha[f"{key}.hada_w2_a"] @ loha[f"{key}.hada_w2_b"]
    torch.testing.assert_close(lw.loha_delta(loha, key), w1 * w2 * 0.5)
    lokr = load_file(lw.write_lokr(tmp_path / "lokr.safetensors", alpha=4.0))
    full, low = sorted({k.rsplit(".", 1)[0] for k in lokr})  # attn1.to_q: full w2; attn2.to_k: rank-2 w2
    assert f"{full}.lokr_w2" in lokr and f"{low}.lokr_w2_a" in lokr
    # full factors: alpha is ignored (scale 1); low-rank w2: scale alpha / 2
    torch.testing.assert_close(lw.lokr_delta(lokr, full), torch.kron(lokr[f"{full}.lokr_w1"], lokr[f"{full}.lokr_w2"]))
    w2_low = lokr[f"{low}.lokr_w2_a"] @ lokr[f"{low}.lokr_w2_b"]
    torch.testing.assert_close(lw.lokr_delta(lokr, low), torch.kron(lokr[f"{low}.lokr_w1"], w2_low) * 2.0)
    assert lw.lokr_delta(lokr, full).shape == (32, 32)


# --- broken files ------------------------------------------------------------------------------


def test_broken_files_are_broken(tmp_path: Path, tiny_sd15: dict[str, Any]) -> None:
    for write in (lw.write_not_safetensors, lw.write_truncated):
        path = write(tmp_path / f"{write.__name__}.safetensors")
        with pytest.raises(SafetensorError):
            load_file(path)
    assert not any("lora" in k for k in load_file(lw.write_no_lora_keys(tmp_path / "none.safetensors")))
    nan = load_file(lw.write_nan_lora(tmp_path / "nan.safetensors"))
    assert any(torch.isnan(v).any() for v in nan.values())
    weights = dict(tiny_sd15["unet"].named_parameters())
    target = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    wrong = load_file(lw.write_wrong_shape_lora(tmp_path / "wrong.safetensors"))
    down = wrong["lora_unet_" + target.replace(".", "_") + ".lora_down.weight"]
    assert down.shape[1] != weights[f"{target}.weight"].shape[1]
    other = lw.write_other_arch_lora(tmp_path / "flux.safetensors")
    with safe_open(str(other), "pt") as f:
        assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in f.keys())
