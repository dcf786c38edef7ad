"""LoRA file parsing: formats, scales, dense fallbacks and one-line errors (handmade files)."""

from __future__ import annotations

import json
import pickle
import warnings

import pytest
import torch
from safetensors.torch import save_file

import mole_core as mole
from mole_core.lora_files import factors_from_state_dict

K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CANON = "unet:down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _kohya(alpha=2.0, rank=4):
    g = torch.Generator().manual_seed(0)
    return {f"{K}.lora_down.weight": torch.randn(rank, 32, generator=g),
            f"{K}.lora_up.weight": torch.randn(32, rank, generator=g), f"{K}.alpha": torch.tensor(alpha)}


def test_kohya_alpha_scale(tmp_path):
    save_file(_kohya(), tmp_path / "a.safetensors")
    e = mole.load_expert(tmp_path / "a.safetensors")
    f = e.factors[CANON]
    assert e.format == "kohya" and f.rank == 4 and f.scale == 0.5
    assert len(e.sha256) == 64


def test_missing_alpha_means_scale_one():
    sd = _kohya()
    del sd[f"{K}.alpha"]
    f, _, _ = factors_from_state_dict(sd, "x")
    assert f[CANON].scale == 1.0


def test_diffusers_metadata_and_peft_config_give_alpha(tmp_path):
    sd = _kohya()
    t = {f"unet.{CANON[5:]}.lora_A.weight": sd[f"{K}.lora_down.weight"],
         f"unet.{CANON[5:]}.lora_B.weight": sd[f"{K}.lora_up.weight"]}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8,
                                                  "unet.alpha_pattern": {}})}
    save_file(t, tmp_path / "d.safetensors", metadata=meta)
    e = mole.load_expert(tmp_path / "d.safetensors")
    assert e.format == "diffusers" and e.factors[CANON].scale == 2.0
    # PEFT folder with adapter_config.json, alpha_pattern and rsLoRA
    folder = tmp_path / "peft" / "unet"
    folder.mkdir(parents=True)
    save_file({f"base_model.model.{CANON[5:]}.lora_A.weight": t[f"unet.{CANON[5:]}.lora_A.weight"],
               f"base_model.model.{CANON[5:]}.lora_B.weight": t[f"unet.{CANON[5:]}.lora_B.weight"]},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4, "use_rslora": True,
                                                            "alpha_pattern": {"attn1.to_q": 16}}))
    e = mole.load_expert(tmp_path / "peft")
    assert e.format == "peft" and e.factors[CANON].scale == pytest.approx(16 / 2)


def test_tucker_mid_folds_exactly():
    g = torch.Generator().manual_seed(1)
    down, mid, up = torch.randn(3, 8, 1, 1, generator=g), torch.randn(3, 3, 3, 3, generator=g), \
        torch.randn(6, 3, 1, 1, generator=g)
    k = "lora_unet_down_blocks_0_resnets_0_conv1"
    f, _, _ = factors_from_state_dict({f"{k}.lora_down.weight": down, f"{k}.lora_mid.weight": mid,
                                       f"{k}.lora_up.weight": up}, "x")
    x = torch.randn(2, 8, 7, 7, generator=g)
    ref = torch.nn.functional.conv2d(torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down), mid,
                                                                padding=1), up)
    fac = f["unet:down_blocks.0.resnets.0.conv1"]
    got = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, fac.down, padding=1), fac.up)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_loha_lokr_diff_become_exact_dense_experts():
    g = torch.Generator().manual_seed(2)
    w1a, w1b, w2a, w2b = (torch.randn(32, 4, generator=g), torch.randn(4, 32, generator=g),
                          torch.randn(32, 4, generator=g), torch.randn(4, 32, generator=g))
    lokr1, lokr2 = torch.randn(4, 4, generator=g), torch.randn(8, 8, generator=g)
    diff = torch.randn(32, 32, generator=g)
    k2 = K.replace("to_q", "to_k")
    k3 = K.replace("to_q", "to_v")
    sd = {f"{K}.hada_w1_a": w1a, f"{K}.hada_w1_b": w1b, f"{K}.hada_w2_a": w2a, f"{K}.hada_w2_b": w2b,
          f"{K}.alpha": torch.tensor(2.0), f"{k2}.lokr_w1": lokr1, f"{k2}.lokr_w2": lokr2, f"{k3}.diff": diff}
    with pytest.warns(mole.MoleWarning, match="dense delta"):
        f, _, _ = factors_from_state_dict(sd, "x")
    torch.testing.assert_close(f[CANON].delta(), (w1a @ w1b) * (w2a @ w2b) * 0.5)
    torch.testing.assert_close(f[CANON.replace("to_q", "to_k")].delta(), torch.kron(lokr1, lokr2))
    torch.testing.assert_close(f[CANON.replace("to_q", "to_v")].delta(), diff)


def test_errors_are_one_line_and_name_the_file(tmp_path):
    cases = {}
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    cases["junk.safetensors"] = "not a safetensors file"
    save_file(_kohya(), tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    cases["cut.safetensors"] = "truncated|unreadable"
    (tmp_path / "p.ckpt").write_bytes(pickle.dumps({"a": 1}))
    cases["p.ckpt"] = "only .safetensors"
    save_file({"model.weight": torch.ones(2)}, tmp_path / "nolora.safetensors")
    cases["nolora.safetensors"] = "no LoRA keys"
    bad = _kohya()
    bad[f"{K}.lora_up.weight"][0, 0] = float("nan")
    save_file(bad, tmp_path / "nan.safetensors")
    cases["missing.safetensors"] = "file not found"
    dora = _kohya()  # kohya / LyCORIS DoRA (dora_scale) is read; PEFT's layout is not
    dora[f"{K}.lora_magnitude_vector"] = torch.ones(32, 1)
    save_file(dora, tmp_path / "dora.safetensors")
    cases["dora.safetensors"] = "DoRA"
    half = _kohya()
    del half[f"{K}.lora_up.weight"]
    save_file(half, tmp_path / "half.safetensors")
    cases["half.safetensors"] = "incomplete LoRA module"
    for fname, pattern in cases.items():
        with pytest.raises(mole.MoleError, match=pattern) as info:
            mole.load_expert(tmp_path / fname)
        msg = str(info.value)
        assert "\n" not in msg and fname.split(".")[0] in msg, msg
    e = mole.load_expert(tmp_path / "nan.safetensors")  # finiteness is checked when experts are used
    with pytest.raises(mole.MoleError, match="NaN/inf"):
        mole.attach(torch.nn.Linear(2, 2), [e])


def test_duplicate_experts_warn(tmp_path):
    save_file(_kohya(), tmp_path / "a.safetensors")
    save_file(_kohya(), tmp_path / "b.safetensors")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        experts = mole.load_experts([tmp_path / "a.safetensors", f"{tmp_path / 'b.safetensors'}:0.5"])
    assert any("same file" in str(x.message) for x in w)
    assert experts[1].strength == 0.5


def test_parse_lora_spec():
    assert mole.parse_lora_spec("a.safetensors:0.7") == ("a.safetensors", 0.7)
    assert mole.parse_lora_spec("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)
    assert mole.parse_lora_spec("a.safetensors:-1e-1") == ("a.safetensors", -0.1)


def test_tensors_that_are_no_lora_factor_warn_and_are_ignored(tmp_path):
    """Unknown extra content in a LoRA file warns (issue #14) instead of being dropped without a word."""
    import warnings

    import torch
    from safetensors.torch import save_file

    import mole_core

    sd = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(2, 8),
          "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(8, 2),
          "training_step_counter": torch.zeros(1)}
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        expert = mole_core.load_expert(tmp_path / "extra.safetensors")
    messages = [str(w.message) for w in rec if issubclass(w.category, mole_core.MoleWarning)]
    assert any("1 tensors are no LoRA factor" in m and "training_step_counter" in m for m in messages), messages
    assert expert.skipped_keys == ["training_step_counter"] and len(expert.factors) == 1
