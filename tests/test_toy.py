"""The toy world (mole_toy): generator, probes, committed assets, LoRA files, quick rebuild."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mole_toy import world as W
from mole_toy.api import DEFAULT_ASSETS, composition_prompts, load_world, write_reference_folder
from mole_toy.probes import Probe, accuracy, soft_mask

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world():  # noqa: ANN201
    if not (DEFAULT_ASSETS / "manifest.json").is_file():
        pytest.fail(f"toy assets missing at {DEFAULT_ASSETS}: run `python -m mole_toy build`")
    return load_world()


@pytest.fixture(scope="module")
def pipe(world):  # noqa: ANN001, ANN201
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(str(world.pipeline_dir), local_files_only=True, safety_checker=None,
                                                requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


# ----- generator -----

@pytest.mark.parametrize("spec", W.sample_specs(40, 123, W.ALL_VALUES), ids=lambda s: W.caption(s).replace(" ", "_"))
def test_caption_matches_pixels(spec: W.Spec) -> None:
    img = W.render(spec).astype(int)
    assert img.shape == (W.SIZE, W.SIZE, 3)
    assert W.parse_caption(W.caption(spec)) == spec.attributes
    assert (img[0, 0] == W.BACKGROUNDS[spec.background]).all()  # corners are background
    inside = W.shape_mask(spec) == 1.0
    assert inside.sum() > 60
    colour = np.asarray(W.COLOURS[spec.colour])
    px = img[inside]
    # every covered pixel is the colour times a brightness in [DARK, 1] (texture edges are anti-aliased)
    k = px @ colour / (colour @ colour)
    assert np.abs(px - k[:, None] * colour).max() <= 1.5
    assert k.min() >= W.DARK - 0.02 and k.max() <= 1.01
    share_dark = (k < (1 + W.DARK) / 2).mean()
    expected = {"plain": (0.0, 0.0), "dotted": (0.1, 0.45), "striped": (0.3, 0.7)}[spec.texture]
    assert expected[0] <= share_dark <= expected[1]


def test_generator_is_deterministic_and_base_subset_excludes_novel() -> None:
    a, b = W.sample_specs(10, 7), W.sample_specs(10, 7)
    assert a == b and (W.render_batch(a) == W.render_batch(b)).all()
    for spec in W.sample_specs(200, 1):
        for attr, value in W.NOVEL.items():
            assert spec.attributes[attr] != value and value not in W.caption(spec).split()


# ----- probes -----

def test_colour_texture_background_probes_exact_on_clean_images() -> None:
    specs = W.sample_specs(300, 321, W.ALL_VALUES)
    acc = accuracy(Probe(None).batch(list(W.render_batch(specs))), [s.attributes for s in specs])
    assert acc["colour"] == acc["texture"] == acc["background"] == 1.0


def test_shape_probe_accurate_on_clean_images(world) -> None:  # noqa: ANN001
    specs = W.sample_specs(300, 654, W.ALL_VALUES)
    acc = accuracy(world.probe.batch(list(W.render_batch(specs))), [s.attributes for s in specs])
    assert acc["shape"] >= 0.95 and acc["all"] >= 0.95
    assert world.manifest["metrics"]["probe"]["clean"]["all"] >= 0.95


def test_probe_score_and_empty_image(world) -> None:  # noqa: ANN001
    spec = W.Spec("purple", "striped", "star", "pink")
    s = world.probe.score(W.render(spec), spec.attributes)
    assert s["all"] and s["fraction"] == 1.0
    blank = np.full((32, 32, 3), 128, np.uint8)
    assert soft_mask(blank).max() == 0.0
    assert world.probe(blank)["shape"] == "none"


# ----- committed assets -----

def test_assets_small_and_pickle_free(world) -> None:  # noqa: ANN001
    files = [p for p in world.root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert {p.suffix for p in files} <= {".safetensors", ".json", ".txt"}


def test_pipeline_loads_offline_and_samples(world, pipe) -> None:  # noqa: ANN001
    from mole_toy.models import make_pixel_vae

    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float32
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample, x, atol=2e-3)
        assert torch.allclose(make_pixel_vae().decode(x).sample, x, atol=1e-3)
    out = pipe("a red circle on grey", num_inference_steps=4, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_tokenizer_matches_open_clip(world) -> None:  # noqa: ANN001
    import open_clip
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(world.pipeline_dir / "tokenizer"))
    text = "a purple striped star on pink"
    ids = tok(text).input_ids
    assert ids == open_clip.tokenize([text])[0, : len(ids)].tolist()


@pytest.mark.parametrize("name", [c.name for c in W.CONCEPTS])
def test_lora_file_loads_with_mole_core(world, pipe, name: str) -> None:  # noqa: ANN001
    import mole_core

    info = world.manifest["concepts"][name]
    expert = mole_core.load_expert(world.lora_paths[name])
    assert expert.format == info["format"]
    comps = {k.split(":")[0] for k in expert.factors}
    assert comps == {"unet", "te"}
    ids = pipe.tokenizer([f"a {info['trigger']} circle on grey"] if info["attribute"] == "colour" else
                         ["a red circle on grey"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x, t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    with torch.no_grad():
        base = pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample
        mix = mole_core.attach(pipe, [expert], mode="static", weights=[1.0])
        try:
            lora = pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample
        finally:
            mix.detach()
        again = pipe.unet(x, t, pipe.text_encoder(ids)[0]).sample
    assert (lora - base).abs().mean() > 1e-3
    assert torch.equal(again, base)
    repro = world.manifest["metrics"]["lora_reproduction"][name]
    assert repro["mismatch_max_abs"] <= 0.02 * max(1.0, repro["effect_mean_abs"] * 10)


def test_single_concept_accuracy_recorded(world) -> None:  # noqa: ANN001
    for name, m in world.manifest["metrics"]["generation"]["concepts"].items():
        attr = world.manifest["concepts"][name]["attribute"]
        assert m["with_lora"][attr] > m["without_lora"][attr]


# ----- helpers for the benchmark and the trainer -----

def test_composition_prompts_cover_subsets() -> None:
    comps = composition_prompts(3, per_set=2)
    assert len(comps) == 4 * 2  # C(4, 3) subsets
    for c in comps:
        assert len(c.concepts) == 3 and W.parse_caption(c.prompt) == c.wanted
        for name in c.concepts:
            assert name in c.prompt.split()


def test_reference_folder_readable_by_trainer(tmp_path: Path) -> None:
    from train.data import scan_folder

    root = write_reference_folder(tmp_path / "refs", ["purple", "star"], n=3)
    refs = scan_folder(root)
    assert len(refs) == 6 and {r.concept for r in refs} == {"purple", "star"}
    assert all(r.concept in r.caption.split() for r in refs)


@pytest.mark.slow
def test_quick_build_smoke(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    proc = subprocess.run([sys.executable, "-m", "mole_toy", "build", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["concepts"]) == {c.name for c in W.CONCEPTS}
    for c in manifest["concepts"].values():
        assert (out / c["file"]).is_file()
    assert (out / "pipeline" / "model_index.json").is_file()
    assert load_world(out).probe is not None

    # build-clip retrains only the toy CLIP of that world, here with hard negatives; a negative count is refused
    files = {p: p.read_bytes() for p in out.rglob("*.safetensors") if "clip" not in p.parts}
    proc = subprocess.run([sys.executable, "-m", "mole_toy", "build-clip", "--quick", "--hard-negatives", "4",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["clip"]["training"]["hard_negatives"] == 4
    assert all(p.read_bytes() == b for p, b in files.items())
    bad = subprocess.run([sys.executable, "-m", "mole_toy", "build-clip", "--hard-negatives", "-1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--hard-negatives must be ≥ 0, got -1" in bad.stderr
