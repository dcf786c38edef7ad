"""Single-file checkpoints through ComfyUI's ``CheckpointLoaderSimple`` (issue #16): real-size SD1.5 and SD2.x 768-v
files with random weights, written by ComfyUI's own checkpoint saver in the layout users download (UNet, text
encoder and VAE in one file). ComfyUI recognises the family (SD2.x's v-prediction from the file itself); MoLE's
static and NLA mixes equal chained ``LoraLoader``s on the loaded MODEL and CLIP, text-encoder parts included
(≤ 2/255 on the sampled latents), and gated mode starts at NLA. Slow: each file is 4–5 GB and takes about a
minute to write and load."""

from __future__ import annotations

import gc

import pytest
import torch

from tests.nodes._helpers import comfyui_nodes, lora_loader, sample_text
from tests.nodes._nodes import apply, load

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

FAMILIES = {"sd15": ("SD15", "EPS", "clip_l"), "sd2v": ("SD20", "V_PREDICTION", "clip_h")}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory, comfy_dirs):
    """``(family, MODEL, CLIP, VAE)`` from ``CheckpointLoaderSimple`` on a freshly written file."""
    import folder_paths

    from tests.nodes.testing_pack.real_size import write_checkpoint

    folder = tmp_path_factory.mktemp(f"checkpoints_{request.param}")
    write_checkpoint(folder / f"{request.param}.safetensors", request.param)
    folder_paths.add_model_folder_path("checkpoints", str(folder))
    with torch.inference_mode():
        model, clip, vae = comfyui_nodes().CheckpointLoaderSimple().load_checkpoint(f"{request.param}.safetensors")[:3]
    (folder / f"{request.param}.safetensors").unlink()  # loaded: the file is no longer needed
    yield request.param, model, clip, vae
    del model, clip, vae
    gc.collect()


@pytest.fixture(scope="module")
def experts(mole, checkpoint, comfy_dirs):
    """Two rank-4 kohya LoRAs (attention layers, 3×3 convs and the text encoder) for the loaded model."""
    from tests.nodes import _loras

    family, model, clip, _ = checkpoint
    names = []
    for i in range(2):
        lora = _loras.random_lora(model, clip, seed=60 + i, rank=4, alpha=2.0, scale=0.5)
        assert lora.components() == {"unet", "te"}
        names.append(f"single_{family}_{i}.safetensors")
        _loras.write_kohya(lora, comfy_dirs["loras"] / names[-1])
    return names, load(mole, model, clip, *((n, 1.0, True) for n in names))


def test_checkpoint_loader_recognises_the_family(checkpoint):
    import comfy.model_base

    family, model, clip, vae = checkpoint
    config, prediction, encoder = FAMILIES[family]
    assert type(model.model.model_config).__name__ == config
    assert model.model.model_type == getattr(comfy.model_base.ModelType, prediction)
    assert any(k.startswith(f"{encoder}.") for k in clip.cond_stage_model.state_dict())
    assert sum(p.numel() for p in model.model.diffusion_model.parameters()) > 8e8  # real size: 860 M / 865 M
    assert vae is not None and vae.latent_channels == 4


def test_static_nla_and_gated_start_equal_chained_lora_loaders(mole, checkpoint, experts, comfy_dirs):
    family, model, clip, _ = checkpoint
    names, ex = experts
    loras = comfy_dirs["loras"]
    with torch.inference_mode():
        base = sample_text(model, clip, steps=2)
    nla = None
    for mode, weights, strengths in (("static weights", "0.7, 0.4", (0.7, 0.4)), ("uniform (NLA)", "", (0.5, 0.5))):
        m, c, _ = apply(mole, model, ex, mode, weights, clip=clip)
        ref_m, ref_c = lora_loader(model, clip, loras / names[0], strengths[0])
        ref_m, ref_c = lora_loader(ref_m, ref_c, loras / names[1], strengths[1])
        with torch.inference_mode():
            ours, oracle = sample_text(m, c, steps=2), sample_text(ref_m, ref_c, steps=2)
        assert (ours - oracle).abs().max() <= 2 / 255, (family, mode)
        assert (ours - base).abs().max() > 20 / 255, (family, mode)  # each mix acts well beyond the tolerance
        nla = ours
    m, c, _ = apply(mole, model, ex, "gated", clip=clip)  # untrained gates start at NLA (text encoders at 1/N)
    with torch.inference_mode():
        gated = sample_text(m, c, steps=2)
    # unmerged (hooks) vs merged weights: equal up to rounding, which a real-size network of random weights
    # amplifies (its latents reach ±200): measured against the mix's own effect
    drift = float((gated - nla).norm() / (nla - base).norm())
    print(f"\n{family}: gated start vs NLA, {drift:.2e} of the experts' effect")
    assert drift <= 0.01, family
