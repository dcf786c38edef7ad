"""LoRA Switch and LoRA Composite on diffusers: gate-row maths, one batched Composite call against separate
PEFT runs, and the CLI's images against diffusers ``set_adapters``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mole_core as mole
from tests.fixtures.oracle import diffusers_lora_pipeline, diffusers_static_mixture, unet_inputs
from train.cli import main
from train.method_hooks import MethodHooks


def test_switch_and_composite_rows_by_hand():
    assert [mole.switch_expert(s, 2, [True, False, True]) for s in range(6)] == [0, 0, 2, 2, 0, 0]
    assert [mole.switch_expert(s, 1, [True] * 3) for s in range(4)] == [0, 1, 2, 0]
    assert mole.switch_rows(3, 1, [True, True]).tolist() == [[0.0, 1.0]]
    rows = mole.composite_rows([True, False, True], batch=2)
    assert rows.tolist() == [[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]]
    x = torch.randn(2, 3)
    torch.testing.assert_close(mole.average_blocks(mole.repeat_blocks(x, 3) * torch.tensor([1.0, 2.0, 6.0])
                                                   .repeat_interleave(2)[:, None], 3), 3 * x)
    with pytest.raises(mole.MoleError, match="switches every expert off"):
        mole.composite_rows([False, False], 1)
    with pytest.raises(mole.MoleError, match="`switch_every` must be ≥ 1"):
        mole.switch_expert(0, 0, [True])


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, True]])
def test_one_batched_composite_call_is_the_mean_of_separate_peft_runs(tiny_sd15, lora_set, mask):
    """Composite repeats the batch per expert with one-hot gates and averages: equal to running each LoRA
    alone (diffusers/PEFT, adapter weight 1) and averaging, for the experts that are on."""
    import copy

    unet = copy.deepcopy(tiny_sd15["unet"])
    inputs = unet_inputs(unet, batch=2, seed=3)
    mix = mole.attach(unet, mole.load_experts(lora_set.paths), mode="uniform", mask=mask, components=["unet"])
    hooks = MethodHooks(unet, mix, "composite", timesteps=[])
    calls = []
    probe = unet.register_forward_pre_hook(lambda m, a, k: calls.append(k["sample"].shape[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            ours = unet(**inputs).sample
    finally:
        probe.remove()
        hooks.detach()
        mix.detach()
    assert calls == [2 * sum(mask)]  # one UNet call on N_on · B rows
    separate = []
    for i, on in enumerate(mask):
        if on:
            peft_unet, _ = diffusers_static_mixture(tiny_sd15, [lora_set.paths[i]], [1.0])
            with torch.no_grad():
                separate.append(peft_unet(**unet_inputs(peft_unet, batch=2, seed=3)).sample)
    want = torch.stack(separate).mean(0)
    assert (separate[0] - separate[-1]).abs().max() > 1e-3  # the experts do differ
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


def _image(folder) -> tuple[np.ndarray, dict]:
    path = next(folder.glob("*.png"))
    return np.asarray(Image.open(path), dtype=np.int16), json.loads(Image.open(path).text["mole"])


def _theirs(tiny_sd15_dir, paths, weights, steps: int = 3) -> np.ndarray:
    pipe = diffusers_lora_pipeline(tiny_sd15_dir, paths, weights)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=steps, guidance_scale=5, height=64,
                 width=64, generator=torch.Generator().manual_seed(7)).images[0]
    return np.asarray(image, dtype=np.int16)


SAMPLE = ["--prompt", "a photo of a cat", "--negative", "blurry", "--seed", "7", "--steps", "3", "--size", "64",
          "--cfg", "5"]


def test_composite_with_one_expert_is_that_lora_with_cfg(tiny_sd15_dir, lora_set, tmp_path):
    rc = main(["sample", "--base", str(tiny_sd15_dir), "--lora", str(lora_set.paths[0]), "--method", "composite",
               *SAMPLE, "--out", str(tmp_path)])
    assert rc == 0
    ours, info = _image(tmp_path)
    assert info["mode"] == "composite"
    theirs = _theirs(tiny_sd15_dir, [lora_set.paths[0]], [1.0])
    assert np.abs(ours - theirs).max() <= 1


def test_switch_every_k_at_least_steps_is_the_first_lora_alone(tiny_sd15_dir, lora_set, tmp_path):
    """Experts [2, 0]: the UNet runs expert 2 alone for all 3 steps; the text encoder carries the text parts
    at 1/N (NLA: expert 0's at 1/2; expert 2 has none) — diffusers with per-component adapter weights."""
    paths = [lora_set.paths[2], lora_set.paths[0]]
    rc = main(["sample", "--base", str(tiny_sd15_dir), *[a for p in paths for a in ("--lora", str(p))], "--method",
               "switch", "--switch-every", "3", *SAMPLE, "--out", str(tmp_path)])
    assert rc == 0
    ours, info = _image(tmp_path)
    assert info["switch_experts"] == [0, 0, 0]
    theirs = _theirs(tiny_sd15_dir, paths, [{"unet": 1.0, "text_encoder": 0.5}, {"unet": 0.0, "text_encoder": 0.5}])
    assert np.abs(ours - theirs).max() <= 1


@pytest.mark.parametrize("mask, want", [("1,1,1", [0, 1, 2, 0]), ("1,0,1", [0, 2, 0, 2])])
def test_switch_every_step_alternates_in_the_recorded_gates(tiny_sd15_dir, lora_set, tmp_path, mask, want):
    rc = main(["sample", "--base", str(tiny_sd15_dir), *[a for p in lora_set.paths for a in ("--lora", str(p))],
               "--method", "switch", "--mask", mask, *SAMPLE[:-4], "--steps", "4", "--size", "64", "--out",
               str(tmp_path)])
    assert rc == 0
    _, info = _image(tmp_path)
    assert info["switch_experts"] == want  # one UNet call per step (CFG batched)
    by_step = info["mean_gates_by_bucket"]
    assert sorted(by_step, key=int) == ["0", "1", "2", "3"]
    for step, expert in enumerate(want):
        for gates in by_step[str(step)].values():
            assert gates == [1.0 if i == expert else 0.0 for i in range(3)], (step, gates)


@pytest.mark.parametrize("args, message", [
    (["--method", "gated"], "--method gated needs --gates FILE"),
    (["--method", "static"], "--method static needs --weights"),
    (["--method", "switch", "--uniform"], "--method switch takes no --gates, --weights or --uniform"),
    (["--method", "switch", "--switch-every", "0"], "--switch-every must be ≥ 1"),
    ([], "give exactly one of --gates FILE"),
])
def test_method_flags_are_checked_before_loading(tmp_path, capsys, args, message):
    rc = main(["sample", "--base", str(tmp_path / "missing"), "--lora", str(tmp_path / "x.safetensors"),
               "--prompt", "x", *args, "--out", str(tmp_path / "out")])
    assert rc != 0 and message in capsys.readouterr().err


@pytest.mark.parametrize("command, args, message", [
    ("sample", ["--weights", "nan,1"], "--weights[1]: a finite number is expected"),
    ("sample", ["--uniform", "--strength", "nan"], "--strength: a finite number is expected"),
    ("sample", ["--uniform", "--cfg", "inf"], "--cfg: a finite number is expected"),
    ("sample", ["--uniform", "--size", "0"], "--size: a number in [8, 8192] is expected"),
    ("sample", ["--uniform", "--size", "-64"], "--size: a number in [8, 8192] is expected"),
    ("sample", ["--uniform", "--size", "64x60"], "--size must be multiples of 8 (WxH or one side), got 64x60"),
    ("train", ["--images", ".", "--alpha", "nan"], "`alpha`: a finite number is expected"),
    ("train", ["--images", ".", "--lr", "inf"], "`lr`: a finite number is expected"),
])
def test_bad_numbers_are_one_line_errors_before_loading(tmp_path, capsys, command, args, message):
    extra = ["--prompt", "x", "--out", str(tmp_path / "out")] if command == "sample" else \
        ["--out", str(tmp_path / "g.safetensors")]
    rc = main([command, "--base", str(tmp_path / "missing"), "--lora", str(tmp_path / "x.safetensors"), *args,
               *extra])
    err = capsys.readouterr().err
    assert rc != 0 and message in err and err.count("\n") == 1, err


def test_non_square_size_equals_diffusers(tiny_sd15_dir, lora_set, tmp_path):
    """``--size WxH``: width 64, height 128, as diffusers draws it with the same adapters."""
    rc = main(["sample", "--base", str(tiny_sd15_dir), *[a for p in lora_set.paths for a in ("--lora", str(p))],
               "--weights", "0.5,1,0.25", "--prompt", "a photo of a cat", "--negative", "blurry", "--seed", "7",
               "--steps", "3", "--size", "64x128", "--cfg", "5", "--out", str(tmp_path)])
    assert rc == 0
    ours, info = _image(tmp_path)
    assert ours.shape == (128, 64, 3) and info["size"] == "64x128"
    pipe = diffusers_lora_pipeline(tiny_sd15_dir, lora_set.paths, [0.5, 1.0, 0.25])
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5, height=128,
                  width=64, generator=torch.Generator().manual_seed(7)).images[0]
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1
    with pytest.raises(SystemExit):
        main(["sample", "--base", "x", "--lora", "y", "--uniform", "--prompt", "x", "--size", "64x"])
